"""cloudbuild.yaml deploys every entry point of functions/main.py the way
CONTRACT.md §1 says, and functions/requirements.txt matches requirements.txt.

The pipeline is read as data: each deploy is one ``gcloud functions deploy``
step, with Cloud Build's substitutions resolved from the file's defaults.
"""
from __future__ import annotations

import ast
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from aadrun.config import Settings
from aadrun.policy import load_policy

ROOT = Path(__file__).resolve().parents[1]
PROJECT, PROJECT_NUMBER = "example-project", "123456789"

# entry point -> (trigger, public). CONTRACT.md §1.
EXPECTED = {
    "verify": ("http", False),
    "graph_webhook": ("http", True),
    "policy_sync": ("cloud_event", False),
    "maintenance": ("http", False),
}
SECRET_ENV = {"AADRUN_CLIENT_STATE", "AADRUN_CLIENT_SECRET"}
SECRET_REF = re.compile(r"^[A-Z][A-Z0-9_]*=[a-zA-Z0-9_-]+:(latest|[0-9]+)$")


def entry_points() -> dict[str, str]:
    """Top-level functions of functions/main.py decorated with functions_framework.http / cloud_event."""
    tree = ast.parse((ROOT / "functions" / "main.py").read_text())
    found = {}
    for node in tree.body:
        if not isinstance(node, ast.FunctionDef):
            continue
        for decorator in node.decorator_list:
            if (isinstance(decorator, ast.Attribute) and isinstance(decorator.value, ast.Name)
                    and decorator.value.id == "functions_framework" and decorator.attr in ("http", "cloud_event")):
                found[node.name] = decorator.attr
    return found


def load_build() -> dict:
    return yaml.safe_load((ROOT / "cloudbuild.yaml").read_text())


def substitute(text: str, subs: dict[str, str]) -> str:
    """Cloud Build's substitution: ${NAME} and $NAME; $$ is a literal $."""
    def one(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1) or match.group(2)
        return subs.get(name, match.group(0))
    return re.sub(r"\$\$|\$\{([A-Z_][A-Z0-9_]*)\}|\$([A-Z_][A-Z0-9_]*)", one, text)


def substitutions(build: dict, **overrides: str) -> dict[str, str]:
    return {"PROJECT_ID": PROJECT, "PROJECT_NUMBER": PROJECT_NUMBER,
            **{k: str(v) for k, v in (build.get("substitutions") or {}).items()}, **overrides}


def parse_flags(args: list[str]) -> dict[str, list[str | None]]:
    flags: dict[str, list[str | None]] = {}
    for arg in args:
        assert arg.startswith("--"), f"positional argument {arg!r} after the function name"
        name, eq, value = arg.partition("=")
        flags.setdefault(name, []).append(value if eq else None)
    return flags


def deploys(build: dict, **overrides: str) -> dict[str, dict]:
    """function name -> {"step": step, "flags": {flag: [values]}}, substitutions resolved."""
    subs = substitutions(build, **overrides)
    found: dict[str, dict] = {}
    for step in build["steps"]:
        args = [substitute(str(a), subs) for a in step.get("args") or []]
        if step.get("entrypoint") == "gcloud" and args[:2] == ["functions", "deploy"]:
            name = args[2]
            assert name not in found, f"{name} deployed twice"
            found[name] = {"step": step, "flags": parse_flags(args[3:])}
        else:
            assert "functions deploy" not in " ".join(args), (
                f"step {step.get('id')}: deploy in its own gcloud step so it can be checked")
    return found


def one(flags: dict, name: str) -> str | None:
    values = flags.get(name, [])
    assert len(values) == 1, f"{name} given {len(values)} times"
    return values[0]


def env_vars(flags: dict) -> dict[str, str]:
    assert "--update-env-vars" not in flags and "--env-vars-file" not in flags
    pairs = (item.partition("=") for item in (one(flags, "--set-env-vars") or "").split(","))
    return {key: value for key, _, value in pairs}


def secrets(flags: dict) -> dict[str, str]:
    if "--set-secrets" not in flags:
        return {}
    items = (one(flags, "--set-secrets") or "").split(",")
    for item in items:
        assert SECRET_REF.match(item), f"--set-secrets item {item!r} is not ENV=SECRET:VERSION"
    return dict(item.split("=", 1) for item in items)


def scripts(build: dict) -> str:
    return "\n".join(str(a) for step in build["steps"] for a in step.get("args") or [])


@pytest.fixture(scope="module")
def build() -> dict:
    return load_build()


@pytest.fixture(scope="module")
def deployed(build) -> dict[str, dict]:
    return deploys(build)


def test_the_expected_table_is_the_entry_points_of_main(build):
    assert entry_points() == {name: trigger for name, (trigger, _) in EXPECTED.items()}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_entry_point_is_deployed_as_a_gen2_python312_function_of_the_functions_folder(deployed, build, name):
    flags = deployed[name]["flags"]
    assert one(flags, "--gen2") is None
    assert one(flags, "--runtime") == "python312"
    assert one(flags, "--source") == "functions"
    assert one(flags, "--entry-point") == name
    assert one(flags, "--region") == str(build["substitutions"]["_REGION"])


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_trigger_and_authentication(deployed, name):
    trigger, public = EXPECTED[name]
    flags = deployed[name]["flags"]
    if trigger == "http":
        assert one(flags, "--trigger-http") is None
        assert "--trigger-topic" not in flags
        auth = "--allow-unauthenticated" if public else "--no-allow-unauthenticated"
        other = "--no-allow-unauthenticated" if public else "--allow-unauthenticated"
        assert one(flags, auth) is None and other not in flags
    else:
        assert one(flags, "--trigger-topic") == Settings().topic_changes
        assert one(flags, "--retry") is None, "event functions are not retried unless deployed with --retry"
        assert "--trigger-http" not in flags and "--allow-unauthenticated" not in flags


def test_every_function_is_built_by_the_build_account_setup_gcp_creates(deployed):
    for name, d in deployed.items():
        assert one(d["flags"], "--build-service-account") == (
            f"projects/{PROJECT}/serviceAccounts/aadrun-build@{PROJECT}.iam.gserviceaccount.com"), name
    setup = (ROOT / "scripts" / "setup-gcp").read_text()
    assert '"aadrun-build|' in setup
    roles = re.search(r'for role in ([^;]+); do\n  project_role "\$\(sa aadrun-build\)" "\$role"', setup)
    assert roles and set(roles.group(1).split()) == {
        "roles/logging.logWriter", "roles/artifactregistry.writer", "roles/storage.objectAdmin"}


def test_each_function_runs_as_its_own_service_account(deployed):
    accounts = {name: one(d["flags"], "--service-account") for name, d in deployed.items()}
    for name, account in accounts.items():
        assert re.fullmatch(rf"aadrun-[a-z]+@{PROJECT}\.iam\.gserviceaccount\.com", account), (name, account)
    assert len(set(accounts.values())) == len(accounts), accounts


def test_maintenance_is_called_by_a_scheduler_job_with_an_oidc_token(build, deployed):
    text = scripts(build)
    assert re.search(r"gcloud scheduler jobs \S+ http", text)
    assert "--oidc-service-account-email=" in text
    assert "--oidc-token-audience=" in text
    assert "gcloud functions describe maintenance" in text
    caller = re.search(r"--oidc-service-account-email=(\S+)", substitute(text, substitutions(build))).group(1)
    assert caller not in {one(d["flags"], "--service-account") for d in deployed.values()}, (
        "the scheduler's identity is an invoker only, not a function's runtime account")
    # Scheduler's default is no retry: a failed run (503) would wait for the next schedule.
    retries = re.search(r"--max-retry-attempts=(\d+)", text)
    assert retries and int(retries.group(1)) >= 1
    # A retry of a run that died must find its task leases lapsed: sooner, every task is
    # skipped as held, the run answers 200 and Scheduler stops retrying (a lost removal
    # then waits for the next scheduled reconcile).
    from aadrun.maintenance import LEASE_TTL_S

    backoff = re.search(r"--min-backoff=(\d+)s", text)
    assert backoff and int(backoff.group(1)) > LEASE_TTL_S


def test_secrets_come_from_secret_manager_only(build, deployed):
    for name, d in deployed.items():
        assert not SECRET_ENV & env_vars(d["flags"]).keys(), f"{name}: a secret in --set-env-vars"
        secrets(d["flags"])
    for name in ("graph_webhook", "policy_sync", "maintenance"):
        assert "AADRUN_CLIENT_STATE" in secrets(deployed[name]["flags"]), name
    assert secrets(deployed["verify"]["flags"]) == {}, "verify needs no secret"
    # No value is ever written next to a secret's variable name in the file.
    text = (ROOT / "cloudbuild.yaml").read_text()
    for match in re.finditer(r"(AADRUN_CLIENT_(?:STATE|SECRET))=([^\s,'\"]*)", text):
        assert re.fullmatch(r"[a-z0-9-]+:(latest|[0-9]+)(\$\{_[A-Z_]+\})?", match.group(2)), match.group(0)


def test_the_documented_client_secret_substitution_adds_a_secret_reference(build):
    with_secret = deploys(build, _EXTRA_SECRETS=",AADRUN_CLIENT_SECRET=aadrun-client-secret:latest")
    for name in ("policy_sync", "maintenance"):
        assert secrets(with_secret[name]["flags"])["AADRUN_CLIENT_SECRET"] == "aadrun-client-secret:latest"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_function_environment_is_valid_settings(deployed, name):
    flags = deployed[name]["flags"]
    env = {**env_vars(flags), **{key: "from-secret-manager" for key in secrets(flags)}}
    settings = Settings.from_env(env)
    assert settings.policy_path == "policies/"
    if name != "graph_webhook":
        assert settings.store_url == "firestore://"
    if name in ("graph_webhook", "policy_sync", "maintenance"):
        assert settings.bus == "pubsub" and settings.project == PROJECT
    if name in ("policy_sync", "maintenance"):
        assert settings.iam_mode == "cloudrun"
        assert settings.notification_url and settings.notification_url.endswith("/graph_webhook")


@pytest.mark.parametrize("client_id, status", [("", 1), ("00000000-0000-0000-0000-0000000000aa", 0)])
def test_the_build_stops_first_when_no_client_id_is_given(build, client_id, status):
    first = build["steps"][0]
    script = substitute(first["args"][-1], substitutions(build, _CLIENT_ID=client_id))
    assert subprocess.run(["bash", "-ceu", script], capture_output=True).returncode == status


@pytest.mark.parametrize("name", ["verify", "graph_webhook"])
def test_request_path_functions_serve_concurrent_requests_on_a_whole_vcpu(deployed, name):
    # Below 1 vCPU a function takes one request at a time: every overlapping call
    # would start a cold instance, which can miss Graph's 3 s deadline.
    flags = deployed[name]["flags"]
    assert float(one(flags, "--cpu")) >= 1
    concurrency = int(one(flags, "--concurrency"))
    assert concurrency > 1 and env_vars(flags)["THREADS"] == str(concurrency)   # one gunicorn thread each


@pytest.mark.parametrize("name", ["verify", "graph_webhook"])
def test_request_path_functions_cut_off_slow_requests(deployed, name):
    # Their work takes milliseconds (a first use of a tenant's keys up to 4 documents of
    # 5 s each); the default (60 s) would let a client that trickles its body hold one of
    # an instance's threads for a minute.
    timeout = one(deployed[name]["flags"], "--timeout")
    assert timeout.endswith("s") and 10 <= int(timeout[:-1]) <= 30


def test_tests_validate_and_plan_run_before_any_deploy_and_policies_are_shipped(build):
    ids = [step.get("id") for step in build["steps"]]
    commands = [" ".join(str(a) for a in step.get("args") or []) for step in build["steps"]]
    first_deploy = min(i for i, step in enumerate(build["steps"]) if step.get("entrypoint") == "gcloud")
    position = {what: next(i for i, c in enumerate(commands) if what in c)
                for what in ("scripts/test", "scripts/aadrun validate", "scripts/aadrun plan",
                             "policies functions/policies")}
    assert all(i < first_deploy for i in position.values()), position
    assert "emulators" in build["steps"][position["scripts/test"]]["name"], "the tests need the emulators"
    ship = ids[position["policies functions/policies"]]
    for step in build["steps"][first_deploy:]:
        if step.get("entrypoint") == "gcloud":
            assert ship in step.get("waitFor", [ship]), f"{step['id']} may start before the policies are shipped"


def test_every_step_running_python_installs_it_in_its_own_container(build):
    # Each step is a fresh container of its image, and the workspace's venv links to the
    # Python the test step installed: a step that reuses the venv installs it again.
    for step in build["steps"]:
        script = " ".join(str(a) for a in step.get("args") or [])
        if "scripts/test" in script or "scripts/aadrun" in script:
            assert re.search(r"apt-get install [^\n]*python3 python3-venv", script), step.get("id")


def test_the_shipped_policies_are_the_validated_ones_links_included(build, tmp_path):
    # validate and plan read policies/; the functions read the copy. A linked folder
    # copied as a link would no longer resolve there, and its services would be dropped.
    [ship] = [step for step in build["steps"] if step.get("id") == "ship-policies"]
    shared = tmp_path / "shared-policies"
    shared.mkdir()
    shutil.copy(ROOT / "policies" / "example.yaml", shared / "example.yaml")
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "shared").symlink_to("../shared-policies")   # relative, as in a repository
    (tmp_path / "functions").mkdir()
    subprocess.run(["bash", *ship["args"]], cwd=tmp_path, check=True, timeout=30)
    shipped = load_policy(tmp_path / "functions" / "policies")
    assert list(shipped.services) == list(load_policy(tmp_path / "policies").services) != []


def test_topics_are_created_idempotently_and_policy_sync_gets_a_dead_letter_policy(build):
    text = substitute(scripts(build), substitutions(build))
    subs = substitutions(build)
    for topic in (subs["_TOPIC_CHANGES"], subs["_TOPIC_POLICY"], subs["_TOPIC_DEAD_LETTER"]):
        assert topic in text
    assert re.search(r"gcloud pubsub topics describe .*\|\| gcloud pubsub topics create", text)
    assert subs["_TOPIC_CHANGES"] == Settings().topic_changes and subs["_TOPIC_POLICY"] == Settings().topic_policy
    update = re.search(r"gcloud pubsub subscriptions update (.*?)(?:\n(?!\s)|\Z)", text, re.S).group(0)
    for flag in ("--dead-letter-topic=", "--max-delivery-attempts=", "--min-retry-delay=", "--max-retry-delay="):
        assert flag in update
    assert "transport.pubsub.subscription" in text, "the subscription is found through the Eventarc trigger"


# -- functions/requirements.txt ---------------------------------------------------

def pins(path: Path, section: str | None = None) -> dict[str, str]:
    """package -> version of ``name==version`` lines (of one ``# Section`` only, if given)."""
    found, inside = {}, section is None
    for line in path.read_text().splitlines():
        line = line.strip()
        if line.startswith("#"):
            if section is not None:
                inside = line[1:].strip().lower().startswith(section)
            continue
        if not line or not inside:
            continue
        name, sep, version = line.partition("==")
        assert sep and version.strip(), f"{path.name}: {line!r} is not pinned with =="
        found[re.sub(r"[-_.]+", "-", name.strip().lower())] = version.strip()
    return found


def test_functions_requirements_pin_the_runtime_packages_exactly_as_requirements_txt():
    runtime = pins(ROOT / "requirements.txt", section="runtime")
    assert {"functions-framework", "google-cloud-firestore", "pyjwt"} <= runtime.keys()
    assert pins(ROOT / "functions" / "requirements.txt") == runtime


def test_every_package_the_runtime_needs_is_pinned_so_a_deploy_installs_what_was_tested():
    # The closure of what the pinned runtime packages require (as installed here, markers
    # evaluated), against the pins: a package left out would be resolved anew at each
    # deploy, and one pinned but no longer needed would be installed for nothing.
    from importlib import metadata

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    runtime = {canonicalize_name(name): version for name, version in
               pins(ROOT / "requirements.txt", section="runtime").items()}
    needed, todo = set(), list(runtime)
    while todo:
        name = todo.pop()
        if name in needed:
            continue
        needed.add(name)
        assert metadata.version(name) == runtime.get(name), f"{name}: installed {metadata.version(name)}"
        for text in metadata.requires(name) or []:
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(canonicalize_name(requirement.name))
    assert needed == set(runtime)


def _substitutions(text: str) -> dict[str, str]:
    """gcloud's KEY=VALUE list, with its ``^D^`` form for another delimiter."""
    delimiter = ","
    if text.startswith("^"):
        delimiter, text = text[1:].split("^", 1)
    return dict(item.split("=", 1) for item in text.split(delimiter))


@pytest.mark.parametrize("secret_exists", [False, True])
def test_setup_gcp_ends_with_a_deploy_command_whose_substitutions_the_build_accepts(tmp_path, build,
                                                                                    secret_exists):
    fake = tmp_path / "gcloud"   # answers every call; "describe" finds things when asked to
    fake.write_text("#!/usr/bin/env bash\ncat >/dev/null <&0 2>/dev/null || true\n"
                    'case "$*" in *"projects describe"*) echo 123456789012;; '
                    f'*describe*) exit {0 if secret_exists else 1};; esac\nexit 0\n')
    fake.chmod(0o755)
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "setup-gcp"), "p1", "europe-west1"], capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL,
                          env={"PATH": f"{tmp_path}:/usr/bin:/bin", "HOME": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    given = _substitutions(re.search(r"--substitutions='([^']*)'", proc.stderr).group(1))
    assert set(given) <= set(build["substitutions"]) and {"_REGION", "_CLIENT_ID"} <= set(given)
    if secret_exists:
        assert given["_EXTRA_SECRETS"] == ",AADRUN_CLIENT_SECRET=aadrun-client-secret:latest"
    else:
        assert "_EXTRA_SECRETS" not in given


def test_setup_gcp_stops_when_it_cannot_tell_whether_the_client_state_has_a_value(tmp_path):
    # A failed version list (a token refresh, a missing permission) must not read as
    # "no value yet": a new random client state would replace the one Graph sends.
    calls = tmp_path / "calls"
    fake = tmp_path / "gcloud"
    fake.write_text("#!/usr/bin/env bash\ncat >/dev/null <&0 2>/dev/null || true\n"
                    f'echo "$*" >> {calls}\n'
                    'case "$*" in *"projects describe"*) echo 123456789012;; '
                    '*"versions list"*) echo "ERROR: (gcloud) permission denied" >&2; exit 1;; esac\nexit 0\n')
    fake.chmod(0o755)
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "setup-gcp"), "p1", "europe-west1"], capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL,
                          env={"PATH": f"{tmp_path}:/usr/bin:/bin", "HOME": str(tmp_path)})
    assert proc.returncode != 0 and "could not list the versions of secret aadrun-client-state" in proc.stderr
    made = calls.read_text().splitlines()
    assert any("versions list aadrun-client-state" in c for c in made)
    assert not any("versions add aadrun-client-state" in c for c in made)


@pytest.mark.parametrize("client_id, passes", [
    ("c1000000-0000-0000-0000-00000000000a", True),
    ("", False),
    ("YOUR_ENTRA_APP_CLIENT_ID", False),             # scripts/setup-gcp's placeholder
    ("c1000000-0000-0000-0000-00000000000a ", False),
    (" c1000000-0000-0000-0000-00000000000a", False),    # ^ anchors it too
    ("xc1000000-0000-0000-0000-00000000000a", False),
    ("c1000000-0000-0000-00000000000a", False),          # a group missing
    ("C1000000-0000-0000-0000-00000000000A", True),      # the functions take any case
])
def test_the_check_step_stops_a_build_without_the_client_id_as_a_guid(build, client_id, passes):
    # A client id that is no GUID stops the functions that read Graph at start-up: after
    # the tests, with verify and graph_webhook already deployed.
    [check] = [step for step in build["steps"] if step.get("id") == "check"]
    script = [substitute(str(a), substitutions(build, _CLIENT_ID=client_id)) for a in check["args"]]
    done = subprocess.run(["bash", *script], capture_output=True, text=True, timeout=30)
    assert (done.returncode == 0) == passes, done.stderr
    assert passes or "a GUID" in done.stderr


# Each topic variable, its default, and the account setup-gcp lets publish to it.
_TOPICS = {"TOPIC_CHANGES": ("aadrun-membership-changes", "aadrun-webhook@"),
           "TOPIC_POLICY": ("aadrun-policy-updates", "aadrun-sync@"),
           "TOPIC_DEAD_LETTER": ("aadrun-dead-letter", "gcp-sa-pubsub")}


@pytest.mark.parametrize("secret_exists, renamed", [
    (False, {"TOPIC_CHANGES": "acme-changes", "TOPIC_DEAD_LETTER": "acme-dead"}),
    (True, {"TOPIC_CHANGES": "acme-changes", "TOPIC_DEAD_LETTER": "acme-dead"}),
    (False, {"TOPIC_POLICY": "acme-policy"}),
])
def test_setup_gcp_grants_on_renamed_topics_and_passes_their_names_to_the_build(tmp_path, build, secret_exists,
                                                                                 renamed):
    calls = tmp_path / "calls"
    fake = tmp_path / "gcloud"
    fake.write_text("#!/usr/bin/env bash\ncat >/dev/null <&0 2>/dev/null || true\n"
                    f'echo "$*" >> {calls}\n'
                    'case "$*" in *"projects describe"*) echo 123456789012;; '
                    f'*describe*) exit {0 if secret_exists else 1};; esac\nexit 0\n')
    fake.chmod(0o755)
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "setup-gcp"), "p1", "europe-west1"], capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL,
                          env={"PATH": f"{tmp_path}:/usr/bin:/bin", "HOME": str(tmp_path), **renamed})
    assert proc.returncode == 0, proc.stderr
    made = calls.read_text().splitlines()
    grants = [c for c in made if "topics add-iam-policy-binding" in c]
    given = _substitutions(re.search(r"--substitutions='([^']*)'", proc.stderr).group(1))
    for variable, (default, publisher) in _TOPICS.items():
        name = renamed.get(variable, default)
        assert any(c.split()[5:6] == [name] and publisher in c for c in grants), (variable, grants)
        assert variable not in renamed or not any(default in c for c in made), variable
        assert given.get(f"_{variable}") == renamed.get(variable), variable   # only a renamed one is passed
    assert set(given) <= set(build["substitutions"])
