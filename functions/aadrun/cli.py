"""The operator CLI (CONTRACT.md §8): ``scripts/aadrun COMMAND``.

    validate    policy files                      1: a policy error (file, line, field)
    explain     a decision, step by step          1: denied
    plan        IAM adds/removes, principal count 1: a service over the 1,500 limit
    subscribe   Graph subscriptions now           1: a subscription failed, or a run holds the lease
    resync      delta sync, per group, progress   1: a group failed or a plan was refused
    audit       change log as CSV or JSON         1: the store or the output failed

Exit codes: 0 success, 1 a finding or a denial, 2 bad usage (argparse's own, a
configuration variable missing or invalid, a ``resync --group`` no policy names, or
a command that reads the store pointed at a SQLite store that does not exist).
Every command takes ``--json``; logs go to stderr, so stdout carries only the
command's output.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import datetime as dt
import json
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from . import audit
from .config import Settings
from .errors import AadrunError, ConfigError, PlanError, PolicyError, UpstreamError
from .messages import is_guid
from .policy import MAX_PRINCIPALS, load_policy, policy_files
from .tokens import STEPS

EXIT_OK, EXIT_FINDING, EXIT_USAGE = 0, 1, 2


def _emit(args, payload: dict, text: Callable[[dict], str]) -> None:
    with _reader_may_stop():
        print(json.dumps(payload, indent=2, default=str) if args.json else text(payload))


class OutputError(AadrunError):
    """The command's output could not be written (a full disk, a closed stream)."""

    reason = "output_failed"


@contextlib.contextmanager
def _reader_may_stop():
    """Output to a reader that stops early (| head) is no failure: what is left goes
    nowhere, and the command still ends with its own exit code. Any other write
    failure is (exit 1, one line, no traceback)."""
    try:
        yield
        sys.stdout.flush()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except OSError as e:
        raise OutputError(f"cannot write the output: {e.strerror or e}") from None


@contextlib.contextmanager
def _whole_file(path: Path):
    """A file that appears complete or not at all: written beside ``path`` and moved
    in place at the end, so an export cut short (a full disk) never passes for a
    whole one. A device or a pipe (/dev/stdout, a FIFO) is written to directly."""
    if path.exists() and not path.is_file():
        with open(path, "w", newline="", encoding="utf-8") as out:
            yield out
        return
    fd, part = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "w", newline="", encoding="utf-8") as out:
            yield out
        os.replace(part, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(part)
        raise


def cmd_validate(args, settings: Settings) -> int:
    if args.policy is not None and not args.policy.strip():   # "$UNSET_VARIABLE": never the default
        print("error: --policy is empty", file=sys.stderr)
        return EXIT_USAGE
    path = settings.policy_path if args.policy is None else args.policy
    try:
        policy = load_policy(path)
    except PolicyError as e:
        found = [{"file": x.file, "line": x.line, "field": x.field, "message": x.message} for x in e.errors]
        text = "\n".join(f"error: {x}" for x in e.errors)
        _emit(args, {"valid": False, "error": found[0], "errors": found}, lambda p: text)
        return EXIT_FINDING
    warnings = [{"file": x.file, "line": x.line, "field": x.field, "message": x.message} for x in policy.warnings]
    # A warning is printed; with --strict it is a finding (exit 1), e.g. to stop a build.
    refused = bool(warnings and args.strict)
    payload = {"valid": not refused, "files": [str(f) for f in policy_files(path)], "tenants": sorted(policy.tenants),
               "services": sorted(policy.services), "warnings": warnings}
    verdict = f"not ok (--strict): {len(warnings)} warning(s) in" if refused else "ok:"
    _emit(args, payload, lambda p: "".join(f"warning: {x}\n" for x in policy.warnings) +
          f"{verdict} {len(p['files'])} file(s), {len(p['tenants'])} tenant(s), "
          f"{len(p['services'])} service(s): {', '.join(p['services'])}")
    return EXIT_FINDING if refused else EXIT_OK


def _explain_token(args, app) -> dict:
    from .verify import log_decision

    app.policy   # a policy that does not load is reported as such (file, line, field), not as a step
    decision = app.verifier.decide(args.service, args.token)
    log_decision(decision, args.token, mode="explain")
    order = ["unknown_service", "missing_token"] + [reason for reason, _ in STEPS] + ["rule"]
    labels = {"unknown_service": "service known to the policies", "missing_token": "a token present",
              **dict(STEPS), "rule": "a rule of the service matches"}
    failed_at = "rule" if decision.reason in ("not_member", "membership_unknown", "no_matching_rule") \
        else decision.reason
    if decision.reason == "unavailable":   # the store, once the token verified; else its keys
        failed_at = "rule" if decision.token else "unknown_key"
    steps, state = [], "pass"
    for step in order:
        if step == failed_at:
            steps.append({"check": labels[step], "outcome": "fail", "reason": decision.reason,
                          **({"detail": decision.detail} if decision.detail else {})})
            state = "skipped"
            continue
        outcome = state
        if step == "rule" and decision.allow:
            outcome = f"pass (access[{decision.rule}], via {decision.via})"
        steps.append({"check": labels[step], "outcome": outcome})
    return {**decision.body(), "status": decision.status, "steps": steps}


def _explain_user(args, app) -> dict:
    from .decide import decide
    from .verify import STATUS

    policy = app.policy
    service = policy.services[args.service]   # cmd_explain checked it
    states = app.store.membership(service.tenant, args.user, service.groups) if service.groups else {}
    groups = []
    for group in service.groups:
        sync = app.store.sync_state(service.tenant, group)
        groups.append({"group": group, "member": states.get(group),
                       "synced_at": sync.synced_at.isoformat() if sync else None,
                       "source": "membership store (Microsoft Graph delta)" if sync else "never synced"})
    outcome = decide(service, tuple(args.role or ()), states)
    return {"allow": outcome.allow, "reason": outcome.reason, "status": STATUS[outcome.reason],
            "service": service.name, "subject": args.user, "tenant": service.tenant, "rule": outcome.rule,
            "via": outcome.via, "groups": groups}


def cmd_explain(args, settings: Settings) -> int:
    from .app import App

    for flag, value in (("--token", args.token), ("--user", args.user)):
        if value is not None and not value.strip():   # "$UNSET_VARIABLE"
            print(f"error: {flag} is empty", file=sys.stderr)
            return EXIT_USAGE
    if bool(args.token) == bool(args.user):
        print("explain needs exactly one of --token or --user", file=sys.stderr)
        return EXIT_USAGE
    if args.user and not is_guid(args.user):
        print(f"--user must be a user's object id (a GUID), got {args.user!r}", file=sys.stderr)
        return EXIT_USAGE
    app = App(settings)
    if args.service not in app.policy.services:   # a typo, not a denial
        print(f"unknown service {args.service!r}; the policies name: {', '.join(sorted(app.policy.services))}",
              file=sys.stderr)
        return EXIT_USAGE
    payload = _explain_token(args, app) if args.token else _explain_user(args, app)

    def text(p: dict) -> str:
        lines = [f"{'ALLOW' if p['allow'] else 'DENY'} {p.get('service')}: {p['reason']}"]
        for step in p.get("steps", []):
            lines.append(f"  {step['outcome']:<8} {step['check']}" + (f"  [{step['reason']}]" if "reason" in step
                                                                        else "")
                         + (f": {step['detail']}" if "detail" in step else ""))
        for group in p.get("groups", []):
            state = (f"member={group['member']} ({group['source']}, synced {group['synced_at']})"
                     if group["synced_at"] else "never synced: unknown")
            lines.append(f"  group {group['group']}: {state}")
        if p.get("via"):
            lines.append(f"  allowed by access[{p['rule']}] via {p['via']}")
        return "\n".join(lines)

    _emit(args, payload, text)
    return EXIT_OK if payload["allow"] else EXIT_FINDING


def cmd_plan(args, settings: Settings) -> int:
    """Per service: the IAM members aadrun would add and remove, and the principal count
    against Google's limit; then each resource no service names any more, whose managed
    members would all be removed. Exit 1 when a service's plan is refused (over the limit)
    or its Cloud Run service does not exist."""
    from .app import App
    from .iam import IamWriter
    from .managed_write import managed_store
    from .plan import iam_targets, plan_orphan, plan_service

    app = App(settings)
    policy, writer, store = app.policy, IamWriter(settings), managed_store(app.store, settings.iam_mode)
    services, refused, gone, missing = [], {}, [], {}
    by_resource: dict[str, dict] = {}
    for name, resource in iam_targets(policy, store.managed_targets()):
        if resource in by_resource:   # services sharing a resource share its one plan
            by_resource[resource]["also"].append(name)
            continue
        try:
            live, managed = writer.live_bindings(resource), store.managed_members(resource)
            try:
                changes = plan_service(policy, policy.services[name], store.group_members, managed, live) \
                    if name else plan_orphan(resource, managed, live)
            except PlanError as e:
                refused[name or resource] = str(e)
                if not name:
                    continue
                # Its grants are refused; its revocations are still made (as policy_sync does),
                # unless even they leave the live policy over the limit: then nothing is written.
                changes = plan_service(policy, policy.services[name], store.group_members, managed, live,
                                       grants=False)
                if changes.principals > MAX_PRINCIPALS:
                    continue
        except UpstreamError as e:
            if e.status_code != 404:
                raise
            if name:
                missing[name] = resource   # not deployed yet, or a typo: a finding, the other plans go on
            else:
                gone.append(resource)      # deleted with its bindings: drift forgets what aadrun kept there
            continue
        by_resource[resource] = {**changes.to_json(), "also": [], "limit": MAX_PRINCIPALS, "live": live is not None}
        services.append(by_resource[resource])
    payload = {"mode": settings.iam_mode, "services": services, "refused": refused, "gone": gone,
               "missing": missing}
    _emit(args, payload, _plan_text)
    return EXIT_FINDING if refused or missing else EXIT_OK


def _plan_text(p: dict) -> str:
    lines = []
    for s in p["services"]:
        adds = sum(len(c["add"]) for c in s["changes"].values())
        removes = sum(len(c["remove"]) for c in s["changes"].values())
        names = " + ".join([s["service"], *s["also"]]) if s["service"] else "(no service any more)"
        lines.append(f"{names} ({s['cloud_run']}): +{adds} -{removes}, "
                     f"{s['principals']}/{s['limit']} principals" + ("" if s["live"] else " (record mode)")
                     + (" (grants REFUSED: revocations only)" if s["service"] in p["refused"] else ""))
        for role, change in s["changes"].items():
            lines += [f"  + {role} {m}" for m in change["add"]] + [f"  - {role} {m}" for m in change["remove"]]
    lines += [f"REFUSED {name}: {why}" for name, why in p["refused"].items()]
    lines += [f"MISSING {name} ({resource}): no such Cloud Run service (not deployed yet, or a typo in cloud_run)"
              for name, resource in p["missing"].items()]
    lines += [f"GONE {resource}: the Cloud Run service no longer exists (nothing to revoke)" for resource in p["gone"]]
    return "\n".join(lines) or "no service has a cloud_run target"


def cmd_subscribe(args, settings: Settings) -> int:
    """Create, renew or replace Graph subscriptions now (maintenance's subscriptions task)."""
    from .app import App

    result = App(settings).maintenance.run(["subscriptions"])["tasks"]["subscriptions"]

    def text(p: dict) -> str:
        if p["status"] != "ok" and "actions" not in p:
            return f"{p['status']}: {p.get('reason') or p.get('detail')}"
        def detail(a: dict) -> str:
            if "error" in a:
                return f"  {a['error']}"
            return f"  notifies {a.get('notification_url')}, not this webhook" if a["action"] == "foreign" else ""

        return "\n".join(f"{a['action']:<9} {a['tenant']} {a['resource'] or '(the tenant)'}{detail(a)}"
                         for a in p["actions"]) or "no group is referenced by the policies"

    _emit(args, result, text)
    if result.get("error") == "not_configured":   # a variable is missing: the invocation is wrong
        return EXIT_USAGE
    return EXIT_OK if result["status"] == "ok" else EXIT_FINDING


def cmd_resync(args, settings: Settings) -> int:
    """Delta sync from Graph, one group at a time (with a progress bar), through
    policy_sync's own path; shares the reconcile task's lease."""
    from .app import App
    from .maintenance import merge_resync

    if not settings.client_id:   # every read would fail alike: the invocation is wrong
        raise ConfigError("AADRUN_CLIENT_ID is required to read groups from Microsoft Graph")
    if settings.iam_mode == "record" and settings.store_url.startswith("firestore://") and \
            not os.environ.get("FIRESTORE_EMULATOR_HOST"):
        # The deployed functions' store (the emulator's is a local stack's): record mode would
        # change what aadrun manages without changing IAM, dropping revoked members from it,
        # so drift would never revoke them.
        raise ConfigError("resync against the functions' store needs AADRUN_IAM=cloudrun, as policy_sync "
                          "has (or run maintenance's reconcile task)")
    app = App(settings)
    referenced = app.policy.referenced_groups()
    groups = [(t, g) for t, names in sorted(referenced.items()) if args.tenant in (None, t)
              for g in sorted(names) if args.group in (None, g)]
    if not groups and (args.group is not None or args.tenant not in (None, *referenced)):
        # A flag naming what the policies do not: the invocation is wrong. (Policies
        # that simply name no group leave nothing to read: an empty summary, exit 0.)
        print("resync: no group referenced by the policies matches", file=sys.stderr)
        return EXIT_USAGE
    out = {"groups": 0, "reads": {}, "added": 0, "removed": 0, "changes": [], "iam": {}, "refused": {}, "errors": []}
    with app.maintenance.lease("reconcile") as held:
        if not held:
            print("resync: another run holds the reconcile lease; try again later", file=sys.stderr)
            return EXIT_FINDING
        bar = Progress(len(groups), sys.stderr, args.progress)
        for tenant, group in groups:
            try:
                merge_resync(out, app.sync.resync(tenant=tenant, group=group, full=args.full,
                                                  raise_errors=False).to_json(), tenant=tenant, group=group)
            except AadrunError as e:
                out["errors"].append({"tenant": tenant, "group": group, "error": type(e).__name__, "detail": str(e)})
            bar.step()
        bar.close()
    _emit(args, out, lambda p: (f"{p['groups']} group(s): +{p['added']} -{p['removed']} member(s), "
                                f"IAM changed on {len(p['iam'])} service(s)"
                                + "".join(f"\nREFUSED {n}: {w}" for n, w in p["refused"].items())
                                + "".join(f"\nERROR {e.get('group', '')} {e['error']}"
                                          + (f": {e['detail']}" if e.get("detail") else "") for e in p["errors"])))
    return EXIT_FINDING if out["errors"] or out["refused"] else EXIT_OK


class Progress:
    """A one-line progress bar on ``stream``: shown when ``enabled`` (default: when the
    stream is a terminal) and there is more than one step."""

    WIDTH = 30

    def __init__(self, total: int, stream, enabled: bool | None = None):
        self.total, self.done, self.stream = total, 0, stream
        self.on = (stream.isatty() if enabled is None else enabled) and total > 1

    def step(self) -> None:
        self.done += 1
        if self.on:
            filled = self.WIDTH * self.done // self.total
            self.stream.write(f"\r[{'#' * filled}{'.' * (self.WIDTH - filled)}] {self.done}/{self.total} groups")
            self.stream.flush()

    def close(self) -> None:
        if self.on:
            self.stream.write("\n")


AUDIT_COLUMNS = ("seq", "at", "kind", "tenant", "group", "user", "service", "role", "member", "source", "why",
                 "message_id")


# Change-log entries that change no access (``ChangeEntry``): exported on request only.
CLAIMS = frozenset({"iam_claimed", "iam_unclaimed"})


def cmd_audit(args, settings: Settings) -> int:
    """The change log (who gained or lost what, when, why, from which message) as CSV
    or JSON: evidence for access reviews. ``--claims`` adds the IAM claims aadrun
    records around its set calls (a claim with no grant after it shows a grant that
    may have been made just before a crash)."""
    from .store import open_store

    if args.json and args.format == "csv":
        print("error: --json asks for JSON and --format csv for CSV: give one", file=sys.stderr)
        return EXIT_USAGE
    entries = [e.to_json() for e in open_store(settings.store_url, settings.project).changes(since=args.since)
               if args.claims or e.kind not in CLAIMS]

    def write(out) -> None:
        if args.json or args.format == "json":
            json.dump({"since": args.since.isoformat() if args.since else None, "count": len(entries),
                       "entries": entries}, out, indent=2)
            out.write("\n")
        else:
            writer = csv.DictWriter(out, fieldnames=AUDIT_COLUMNS, extrasaction="ignore", lineterminator="\n")
            writer.writeheader()
            writer.writerows({k: _cell(v) for k, v in e.items()} for e in entries)

    if not args.output:
        with _reader_may_stop():
            write(sys.stdout)
        return EXIT_OK
    target = Path(args.output)
    if target.is_dir() or not target.parent.is_dir():   # a wrong path: the invocation is wrong
        print(f"error: cannot write {target}: {'a folder' if target.is_dir() else 'no such folder'}",
              file=sys.stderr)
        return EXIT_USAGE
    untouched = "; the file is as it was" if target.is_file() else "" if target.exists() else "; no file made"
    try:
        with _whole_file(target) as out:
            write(out)
    except OSError as e:
        raise OutputError(f"cannot write {target}: {e.strerror or e}{untouched}") from None
    return EXIT_OK


def _cell(value):
    # A spreadsheet runs a cell that starts like a formula (OWASP "CSV injection"):
    # such a value is exported as text.
    return "'" + value if isinstance(value, str) and value.startswith(("=", "+", "-", "@", "\t", "\r")) else value


def since_arg(text: str) -> dt.datetime:
    """``--since``: a date (midnight UTC) or an ISO 8601 time (naive means UTC)."""
    try:
        value = dt.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date or ISO 8601 time: {text!r}") from None
    return value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)


COMMANDS: dict[str, tuple[Callable, str]] = {
    "validate": (cmd_validate, "check the policy files"),
    "explain": (cmd_explain, "explain a decision for a token or a user"),
    "plan": (cmd_plan, "IAM members each service would gain and lose"),
    "subscribe": (cmd_subscribe, "create, renew or replace Graph subscriptions"),
    "resync": (cmd_resync, "delta sync of the referenced groups from Microsoft Graph"),
    "audit": (cmd_audit, "export the access change log as CSV or JSON"),
}

# command -> its arguments (besides --json), as add_argument's (flags, options).
ARGUMENTS: dict[str, list[tuple[tuple[str, ...], dict]]] = {
    "validate": [(("--policy",), {"help": "file or folder (default: AADRUN_POLICY_PATH or policies/)"}),
                 (("--strict",), {"action": "store_true", "help": "a warning is a finding too (exit 1)"})],
    "explain": [(("--service",), {"required": True}),
                (("--token",), {"help": "an access token to check"}),
                (("--user",), {"type": str.lower, "help": "a user object id (decide from membership alone)"}),
                (("--role",), {"action": "append", "help": "with --user: an app role the user holds"})],
    "plan": [],
    "subscribe": [],
    "resync": [(("--group",), {"type": str.lower, "help": "one group object id (default: every referenced group)"}),
               (("--tenant",), {"type": str.lower, "help": "only the groups of this tenant"}),
               (("--full",), {"action": "store_true", "help": "full reads instead of incremental ones"}),
               (("--progress",), {"action": argparse.BooleanOptionalAction, "default": None,
                                  "help": "progress bar on stderr (default: when stderr is a terminal)"})],
    "audit": [(("--since",), {"type": since_arg, "help": "DATE or ISO 8601 time (UTC when no offset)"}),
              (("--format",), {"choices": ("csv", "json"), "help": "csv (the default) or json"}),
              (("--output", "-o"), {"help": "write to this file instead of stdout"}),
              (("--claims",), {"action": "store_true",
                               "help": "also export iam_claimed / iam_unclaimed entries (no access change)"})],
}


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="aadrun", description="aadrun operator CLI")
    sub = root.add_subparsers(dest="command", required=True)
    for name, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        p.set_defaults(command_parser=p)
        p.add_argument("--json", action="store_true", help="machine-readable output")
        for flags, options in ARGUMENTS[name]:
            p.add_argument(*flags, **options)
    return root


# Commands that read the functions' store. Pointed at one that does not exist (a fresh
# clone, a wrong AADRUN_STORE), they read an empty one, with a warning, and create
# nothing there; ``subscribe`` refuses, since it would replace every subscription,
# finding no record of its client state.
_READ_STORE = frozenset({"explain", "plan", "audit", "subscribe"})
_NEEDS_STORE = frozenset({"subscribe"})


def _missing_store(settings: Settings) -> str | None:
    if not settings.store_url.startswith("sqlite:///"):
        return None
    path = Path(settings.store_url[len("sqlite:///"):])
    return None if path.is_file() else f"no store at {path}: set AADRUN_STORE to the store the functions use"


def main(argv: list[str] | None = None) -> int:
    args, extra = parser().parse_known_args(argv)
    if extra:   # the command's own usage, which names the options it takes
        args.command_parser.error(f"unrecognized arguments: {' '.join(extra)}")
    audit.logger(sys.stderr)  # stdout carries the command's own output
    try:
        settings = Settings.from_env()
        missing = _missing_store(settings) if args.command in _READ_STORE else None
        if missing and args.command in _NEEDS_STORE:
            print(f"error: {missing}", file=sys.stderr)
            return EXIT_USAGE
        if missing:
            print(f"warning: {missing}; read as an empty store", file=sys.stderr)
            with tempfile.TemporaryDirectory(prefix="aadrun-empty-store-") as empty:
                return COMMANDS[args.command][0](
                    args, dataclasses.replace(settings, store_url=f"sqlite:///{empty}/state.db"))
        return COMMANDS[args.command][0](args, settings)
    except ConfigError as e:   # the environment it runs in is wrong: bad usage, like a bad flag
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except AadrunError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FINDING
