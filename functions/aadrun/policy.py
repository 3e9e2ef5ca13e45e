"""Policy files: load, validate and merge (CONTRACT.md §3).

Every error names the file, line and field, and a policy with any error is
refused whole: callers get either a complete ``Policy`` or a ``PolicyError``.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import os
import re
from collections.abc import Iterable
from pathlib import Path

import yaml

from .errors import PolicyError, PolicyErrors
from .messages import GUID, is_guid
CLOUD_RUN = re.compile(r"^projects/[a-z0-9-]{1,63}/locations/[a-z0-9-]{1,63}/services/[a-z0-9-]{1,63}\Z")
ROLE = re.compile(r"^(roles|projects/[a-z][a-z0-9-]{4,28}[a-z0-9]/roles|organizations/[0-9]+/roles)/[A-Za-z0-9_.]+\Z")
SERVICE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}\Z")
DEFAULT_ROLE = "roles/run.invoker"
BINDS = ("members", "group")
# Google's limit on principals in one allow policy (each occurrence counts).
MAX_PRINCIPALS = 1500


@dataclasses.dataclass(frozen=True)
class Tenant:
    id: str
    audiences: tuple[str, ...]
    token_versions: tuple[int, ...] = (2,)


@dataclasses.dataclass(frozen=True)
class Rule:
    """Allows callers in any of ``groups`` or holding any of ``app_roles``."""

    groups: tuple[str, ...] = ()
    app_roles: tuple[str, ...] = ()
    role: str = DEFAULT_ROLE
    bind: str = "members"


@dataclasses.dataclass(frozen=True)
class Service:
    name: str
    tenant: str
    rules: tuple[Rule, ...]
    cloud_run: str | None = None
    audiences: tuple[str, ...] = ()   # ``audience``: overrides the tenant's when given

    @functools.cached_property
    def groups(self) -> tuple[str, ...]:
        """Every group any rule names, in rule order (computed once: read per decision)."""
        seen: dict[str, None] = {}
        for rule in self.rules:
            seen.update(dict.fromkeys(rule.groups))
        return tuple(seen)

    @functools.cached_property
    def app_roles(self) -> frozenset[str]:
        return frozenset(role for rule in self.rules for role in rule.app_roles)


@dataclasses.dataclass(frozen=True)
class Policy:
    tenants: dict[str, Tenant]
    services: dict[str, Service]
    principal: str | None = None
    group_principal: str | None = None
    sources: tuple[str, ...] = ()
    # Problems that do not stop the policy from being applied, located like errors.
    warnings: tuple[PolicyError, ...] = ()

    def audiences_for(self, service: Service) -> tuple[str, ...]:
        return service.audiences or self.tenants[service.tenant].audiences

    def referenced_groups(self) -> dict[str, set[str]]:
        """Tenant id -> every group some rule of that tenant's services names; every
        tenant of the policies is a key (with no groups, its subscriptions are deleted)."""
        out: dict[str, set[str]] = {tenant: set() for tenant in self.tenants}
        for service in self.services.values():
            out.setdefault(service.tenant, set()).update(service.groups)
        return out

    def member_principal(self, oid: str) -> str:
        assert self.principal is not None
        return self.principal.replace("{oid}", oid)

    def group_principal_for(self, group_id: str) -> str:
        assert self.group_principal is not None
        return self.group_principal.replace("{group_id}", group_id)


# --- YAML with positions -------------------------------------------------------

# More values, and longer field paths in all, than any real policy holds: what
# aliases expanding into aliases make (deep ones give every value a long path).
MAX_VALUES = 100_000
MAX_PATH_CHARS = 20_000_000
# How an IAM allow policy names a member (cloud.google.com/iam/docs/principal-identifiers).
_MEMBER_PREFIXES = ("principal://", "principalSet://", "user:", "group:", "serviceAccount:")


class _AliasesWhereUsed(yaml.SafeLoader):
    """Each alias a copy of its anchor's node that knows the alias's line: an error in
    a value reached through an alias is the using entry's, so it names that line, not
    the anchor's (where another entry holds the same value, maybe without the error)."""

    def compose_node(self, parent, index):
        if not self.check_event(yaml.AliasEvent):
            return super().compose_node(parent, index)
        line = self.peek_event().start_mark.line + 1
        node = copy.copy(super().compose_node(parent, index))
        node.alias_line = line
        return node


class _Located:
    """A parsed YAML value together with the line of every key, for error messages."""

    def __init__(self, file: str):
        self.file = file
        self.values = self.path_chars = 0
        self._scalars = yaml.constructor.SafeConstructor()   # YAML's own typing of plain values

    def to_python(self, node: yaml.Node, path: str, lines: dict[str, int], alias_line: int | None = None):
        """``alias_line``: the line of the alias this node was reached through, which
        every value under it is reported at."""
        alias_line = alias_line or getattr(node, "alias_line", None)   # the outermost alias: where it is used

        def line(n: yaml.Node) -> int:
            return alias_line or n.start_mark.line + 1

        self.values += 1
        self.path_chars += len(path)
        if self.values > MAX_VALUES:
            raise PolicyError(f"the document holds, or its aliases expand to, more than {MAX_VALUES} values: "
                              "split the policy into files, or use fewer aliases", file=self.file, line=line(node))
        if self.path_chars > MAX_PATH_CHARS:
            raise PolicyError("its aliases nest the fields too deep (aliases of aliases?)", file=self.file,
                              line=line(node))
        lines.setdefault(path, line(node))
        if isinstance(node, yaml.MappingNode):
            out, merged = {}, []
            for key_node, value_node in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":   # <<: *anchor, or a list of them
                    sources = value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
                    if not all(isinstance(n, yaml.MappingNode) for n in sources):
                        raise PolicyError("a merge key (<<) takes a mapping or a list of mappings", file=self.file,
                                          line=line(key_node), field=path or "(top)")
                    merged += [self.to_python(n, path, {}, alias_line) for n in sources]
                    continue
                key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
                if not isinstance(key, str):
                    raise PolicyError("keys must be strings", file=self.file, line=line(key_node),
                                      field=path or "(top)")
                child = f"{path}.{key}" if path else key
                if key in out:
                    raise PolicyError("key defined twice", file=self.file, line=line(key_node), field=child)
                lines[child] = line(key_node)
                out[key] = self.to_python(value_node, child, lines, alias_line)
            for source in merged:   # keys written out win over merged ones, the first merge over later ones
                for key, value in source.items():
                    out.setdefault(key, value)
            return out
        if isinstance(node, yaml.SequenceNode):
            return [self.to_python(item, f"{path}[{i}]", lines, alias_line) for i, item in enumerate(node.value)]
        if node.tag == "tag:yaml.org,2002:str":
            return node.value
        try:
            return self._scalars.construct_object(node)   # null, bool, int, float...
        except yaml.YAMLError as e:   # e.g. a tag YAML's safe loader does not know
            problem = getattr(e, "problem", None) or e
        except (ValueError, TypeError, KeyError, AttributeError, OverflowError) as e:
            # A known tag on a value it cannot hold (!!int abc, !!bool maybe, !!timestamp x).
            problem = f"{node.value!r} is not a {node.tag.rsplit(':', 1)[-1]} ({e.__class__.__name__})"
        raise PolicyError(f"invalid value: {problem}", file=self.file, line=line(node), field=path or "(top)")


class _Checker:
    """Validates one file's document; ``error`` raises with file, line, field."""

    def __init__(self, file: str, lines: dict[str, int]):
        self.file, self.lines = file, lines

    def error(self, field: str, message: str) -> PolicyError:
        probe = field
        while probe and probe not in self.lines:
            probe = probe.rsplit(".", 1)[0] if "." in probe else ""
        return PolicyError(message, file=self.file, line=self.lines.get(probe), field=field)

    def mapping(self, value, field: str, allowed: Iterable[str]) -> dict:
        if not isinstance(value, dict):
            raise self.error(field, "must be a mapping")
        unknown = sorted(set(value) - set(allowed))
        if unknown:
            raise self.error(f"{field}.{unknown[0]}" if field else unknown[0],
                             f"unknown field (allowed: {', '.join(sorted(allowed))})")
        return value

    def string(self, value, field: str, pattern: re.Pattern | None = None, what: str = "") -> str:
        if isinstance(value, (bool, int, float)):
            # YAML reads yes/no/on/off as booleans and digits as numbers.
            raise self.error(field, f"must be a non-empty string; YAML read {value!r} as a "
                                    f"{type(value).__name__}: quote it")
        if not isinstance(value, str) or not value:
            raise self.error(field, "must be a non-empty string")
        if pattern and not pattern.fullmatch(value):
            raise self.error(field, f"must be {what or pattern.pattern}, got {value!r}")
        return value

    def strings(self, value, field: str, pattern: re.Pattern | None = None, what: str = "") -> tuple[str, ...]:
        if not isinstance(value, list) or not value:
            raise self.error(field, "must be a non-empty list")
        return tuple(self.string(v, f"{field}[{i}]", pattern, what) for i, v in enumerate(value))


def _line_at(before: str) -> int:
    """The line that follows ``before``, its line breaks counted as YAML counts them
    (CR, LF, CRLF, NEL, LS, PS): what precedes a refused character holds no other."""
    return len((before + ".").splitlines())


def _parse_file(path: Path) -> tuple[dict, dict[str, int], str]:
    name = str(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise PolicyError(f"cannot read: {e.__class__.__name__}", file=name) from e
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        # An editor's Latin-1 or UTF-16 file: the line of the first bad byte.
        raise PolicyError(f"not UTF-8: byte 0x{data[e.start]:02x} at offset {e.start}", file=name,
                          line=_line_at(data[:e.start].decode("utf-8"))) from None
    try:
        node = yaml.compose(text, Loader=_AliasesWhereUsed)
    except yaml.reader.ReaderError as e:
        # A character YAML refuses (a control character left by a paste): its line, where
        # the reader gives only an offset into the text.
        raise PolicyError(f"invalid YAML: character {e.character:#06x} is not allowed", file=name,
                          line=_line_at(text[:e.position])) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise PolicyError(f"invalid YAML: {getattr(e, 'problem', None) or e}", file=name,
                          line=mark.line + 1 if mark else None) from e
    except RecursionError:
        raise PolicyError("nested too deep", file=name) from None
    if node is None:
        return {}, {}, name
    lines: dict[str, int] = {}
    try:
        data = _Located(name).to_python(node, "", lines)
    except yaml.YAMLError as e:
        raise PolicyError(f"invalid YAML value: {e}", file=name) from e
    except RecursionError:
        raise PolicyError("nested too deep, or an alias that contains itself", file=name) from None
    if not isinstance(data, dict):
        raise PolicyError("the top level must be a mapping", file=name, line=1)
    return data, lines, name


def _audience(value: str) -> str:
    """Entra writes a client id in ``aud`` in lower case, and verify compares exactly."""
    return value.lower() if is_guid(value) else value


def _tenant(c: _Checker, raw, field: str) -> Tenant:
    raw = c.mapping(raw, field, ("id", "audiences", "token_versions"))
    tid = c.string(raw.get("id"), f"{field}.id", GUID, "a tenant id (GUID)").lower()
    audiences = tuple(_audience(a) for a in c.strings(raw.get("audiences"), f"{field}.audiences"))
    versions = raw.get("token_versions", [2])
    if (not isinstance(versions, list) or not versions
            or any(v not in (1, 2) or isinstance(v, bool) for v in versions)):
        raise c.error(f"{field}.token_versions", "must be a non-empty list of 1 and/or 2")
    return Tenant(tid, audiences, tuple(sorted(set(versions))))


def _rule(c: _Checker, raw, field: str) -> Rule:
    raw = c.mapping(raw, field, ("groups", "app_roles", "role", "bind"))
    groups = tuple(g.lower() for g in c.strings(raw["groups"], f"{field}.groups", GUID, "a group object id (GUID)")) \
        if "groups" in raw else ()
    roles = c.strings(raw["app_roles"], f"{field}.app_roles") if "app_roles" in raw else ()
    if not groups and not roles:
        raise c.error(field, "a rule needs groups or app_roles")
    role = c.string(raw.get("role", DEFAULT_ROLE), f"{field}.role", ROLE, "an IAM role like roles/run.invoker")
    bind = raw.get("bind", "members")
    if bind not in BINDS:
        raise c.error(f"{field}.bind", f"must be one of {', '.join(BINDS)}")
    if not groups and ("bind" in raw or "role" in raw):
        raise c.error(f"{field}.{'bind' if 'bind' in raw else 'role'}",
                      "only group rules are bound in IAM (app roles are checked by verify)")
    return Rule(groups, roles, role, bind)


def _service(c: _Checker, raw, field: str) -> Service:
    raw = c.mapping(raw, field, ("name", "tenant", "cloud_run", "audience", "access"))
    name = c.string(raw.get("name"), f"{field}.name", SERVICE_NAME, "a name of letters, digits, '.', '_', '-'")
    tenant = c.string(raw.get("tenant"), f"{field}.tenant", GUID, "a tenant id (GUID)").lower()
    cloud_run = c.string(raw["cloud_run"], f"{field}.cloud_run", CLOUD_RUN,
                         "projects/P/locations/L/services/S") if "cloud_run" in raw else None
    # One string or a list: a v1 client may ask for the App ID URI, a v2 token carries the client id.
    audiences: tuple[str, ...] = ()
    if "audience" in raw:
        given = raw["audience"]
        audiences = tuple(_audience(a) for a in (c.strings(given, f"{field}.audience") if isinstance(given, list)
                                                 else (c.string(given, f"{field}.audience"),)))
    access = raw.get("access")
    if not isinstance(access, list) or not access:
        raise c.error(f"{field}.access", "must be a non-empty list of rules")
    rules = tuple(_rule(c, r, f"{field}.access[{i}]") for i, r in enumerate(access))
    return Service(name, tenant, rules, cloud_run, audiences)


def parse_documents(docs: list[tuple[dict, dict[str, int], str]], *, complete: bool = True) -> Policy:
    """The policy of parsed files, or ``PolicyError`` naming every problem found:
    one per file, tenant, service and cross-reference (``PolicyErrors`` for several).
    ``complete=False``: some file of the policy could not be read, so references
    (to tenants, to the principals) are not checked: they may be in that file."""
    tenants: dict[str, Tenant] = {}
    services: dict[str, Service] = {}
    # Tenant id, service name -> (file, field): apart, as a service may be named like a tenant.
    where_tenant: dict[str, tuple[_Checker, str]] = {}
    where_service: dict[str, tuple[_Checker, str]] = {}
    singles: dict[str, tuple[object, str]] = {}   # principal, group_principal -> (value as given, file)
    errors: list[PolicyError] = []
    # The tenants named by services that did not parse: references are all reported.
    unparsed: list[tuple[_Checker, str, str]] = []
    for data, lines, name in docs:
        c = _Checker(name, lines)
        try:
            _top_level(c, data)
        except PolicyError as e:
            errors.append(e)
            complete = False
            continue   # its sections cannot be read
        for key in _PLACEHOLDERS:
            try:
                if key in data:
                    _single(c, data, key, singles)
            except PolicyError as e:
                errors.append(e)
        for i, raw in enumerate(data.get("tenants", [])):
            try:
                tenant = _tenant(c, raw, f"tenants[{i}]")
                if tenant.id in tenants:
                    raise c.error(f"tenants[{i}].id", f"tenant {tenant.id} defined twice")
                tenants[tenant.id] = tenant
                where_tenant[tenant.id] = (c, f"tenants[{i}]")
            except PolicyError as e:
                errors.append(e)
        for i, raw in enumerate(data.get("services", [])):
            try:
                service = _service(c, raw, f"services[{i}]")
                if service.name in services:
                    raise c.error(f"services[{i}].name", f"service {service.name} defined twice")
                services[service.name] = service
                where_service[service.name] = (c, f"services[{i}]")
            except PolicyError as e:
                errors.append(e)
                tenant = raw.get("tenant") if isinstance(raw, dict) else None
                if isinstance(tenant, str) and GUID.fullmatch(tenant) and e.field != f"services[{i}].tenant":
                    unparsed.append((c, f"services[{i}].tenant", tenant.lower()))
    # Set (rightly or not, its own error says which): what rules need of it is there.
    has_principal, has_group_principal = "principal" in singles, "group_principal" in singles
    # A tenant that did not parse would make its services' references look wrong too.
    check_tenants = complete and not any(e.field and e.field.startswith("tenants") for e in errors)
    for service in services.values() if complete else ():
        try:
            _references(service, *where_service[service.name], tenants if check_tenants else None,
                        has_principal, has_group_principal)
        except PolicyError as e:
            errors.append(e)
    for c, field, tenant in unparsed if check_tenants else ():
        if tenant not in tenants:
            errors.append(c.error(field, f"tenant {tenant} is not defined under tenants"))
    _raise_all(errors)
    principal = singles.get("principal", (None, ""))[0]
    group_principal = singles.get("group_principal", (None, ""))[0]
    return Policy(tenants, services, principal, group_principal, tuple(d[2] for d in docs),
                  _audience_warnings(services, tenants, where_tenant, where_service)
                  + _project_number_warnings(services, where_service) + _role_warnings(services, where_service))


# The predefined roles Cloud Run grants on a service: its own and the basic ones
# (cloud.google.com/run/docs/reference/iam/roles). A custom role is the operator's own.
_BASIC_ROLES = frozenset({"roles/owner", "roles/editor", "roles/viewer"})


def _role_warnings(services: dict[str, Service],
                   where: dict[str, tuple[_Checker, str]]) -> tuple[PolicyError, ...]:
    """Cloud Run refuses a set call granting a role that does not apply to a service
    (400), which stops every grant of that write: the members of the service's other
    rules would get nothing either."""
    return tuple(where[s.name][0].error(f"{where[s.name][1]}.access[{i}].role",
                                        f"{rule.role} is neither a Cloud Run role (roles/run.*) nor a basic one: "
                                        "Cloud Run refuses a role that does not apply to a service, and aadrun "
                                        f"then grants nothing on {s.cloud_run} (revocations are still made)")
                 for s in services.values() if s.cloud_run for i, rule in enumerate(s.rules)
                 if rule.groups and rule.role.startswith("roles/") and not rule.role.startswith("roles/run.")
                 and rule.role not in _BASIC_ROLES)


def _project_number_warnings(services: dict[str, Service],
                             where: dict[str, tuple[_Checker, str]]) -> tuple[PolicyError, ...]:
    """Cloud Run names one service under its project's id and its number alike, while
    aadrun keys the members it manages by the ``cloud_run`` string: a policy that
    switches between the two, or names one service both ways, would revoke them as
    an orphan's. A project id never is all digits (it starts with a letter)."""
    return tuple(where[s.name][0].error(f"{where[s.name][1]}.cloud_run",
                                        f"projects/{s.cloud_run.split('/')[1]} is a project number: name the project "
                                        "by its id, always the same way (aadrun keeps what it manages per name)")
                 for s in services.values() if s.cloud_run and s.cloud_run.split("/")[1].isdigit())


def _audience_warnings(services: dict[str, Service], tenants: dict[str, Tenant],
                       where_tenant: dict[str, tuple[_Checker, str]],
                       where_service: dict[str, tuple[_Checker, str]]) -> tuple[PolicyError, ...]:
    """A v2 access token's ``aud`` is always the API's client id (a v1 token's is the
    client id or the App ID URI the client asked for): a service taking only v2 tokens
    with no client id among its audiences would refuse every token as wrong_audience."""
    blind: dict[tuple[str, str], list[str]] = {}   # the field that gives the audiences -> its services
    for service in services.values():
        tenant = tenants.get(service.tenant)
        audiences = service.audiences or (tenant.audiences if tenant else ())
        if tenant is not None and tenant.token_versions == (2,) and not any(is_guid(a) for a in audiences):
            owner = ("service", service.name) if service.audiences else ("tenant", tenant.id)
            blind.setdefault(owner, []).append(service.name)
    warnings = []
    for (kind, owner), names in blind.items():
        c, field = where_service[owner] if kind == "service" else where_tenant[owner]
        field += ".audience" if kind == "service" else ".audiences"
        warnings.append(c.error(field, f"no audience is a client id (GUID), but {', '.join(sorted(names))} "
                                       "take(s) only v2 tokens, whose aud is always the API's client id: "
                                       "every token would be refused (wrong_audience)"))
    return tuple(warnings)


def _top_level(c: _Checker, data: dict) -> None:
    """The file's shape: without it, its sections cannot be read."""
    c.mapping(data, "", ("tenants", "services", "principal", "group_principal"))
    for section in ("tenants", "services"):
        if section in data and not isinstance(data[section], list):
            raise c.error(section, "must be a list")


_PLACEHOLDERS = {"principal": "{oid}", "group_principal": "{group_id}"}


def _single(c: _Checker, data: dict, key: str, singles: dict[str, tuple[object, str]]) -> None:
    """``principal`` or ``group_principal``: given once in the policy, an IAM member
    with its one placeholder. Recorded even when wrong, so the rules that need it are
    not reported as missing it too."""
    if key in singles:
        raise c.error(key, f"already set in {singles[key][1]}")
    singles[key] = (data[key], c.file)
    value = c.string(data[key], key)
    placeholder = _PLACEHOLDERS[key]
    if re.findall(r"\{[^{}]*\}", value) != [placeholder]:
        raise c.error(key, f"must contain {placeholder} once, and no other {{...}}")
    if not value.startswith(_MEMBER_PREFIXES):
        raise c.error(key, f"must be an IAM member ({', '.join(_MEMBER_PREFIXES)}...), got {value!r}")


def _references(service: Service, c: _Checker, field: str, tenants: dict[str, Tenant] | None,
                has_principal: bool, has_group_principal: bool) -> None:
    if tenants is not None and service.tenant not in tenants:
        raise c.error(f"{field}.tenant", f"tenant {service.tenant} is not defined under tenants")
    if service.cloud_run:
        for i, rule in enumerate(service.rules):
            if rule.groups and rule.bind == "members" and not has_principal:
                raise c.error(f"{field}.access[{i}]", "binding members in IAM needs a top-level principal")
            if rule.groups and rule.bind == "group" and not has_group_principal:
                raise c.error(f"{field}.access[{i}].bind", "bind: group needs a top-level group_principal")


def policy_files(path: str | os.PathLike) -> list[Path]:
    """The policy files at ``path``: the file, or every *.yaml / *.yml (any case) under
    the folder, links followed. A policy file left out would drop its services, and
    drift would revoke what aadrun granted for them: so a folder that cannot be read,
    a broken link, or a policy name that is not a readable file is an error. So is a
    folder reached twice (a link loop, or one folder linked from two places): the
    build ships the folder with its links copied as their contents, which would hold
    its files twice, or not copy at all."""
    root = Path(path)
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise PolicyError("not a regular file or folder" if root.exists() else "no such file or folder",
                          file=str(root))
    found: list[Path] = []
    problems: list[PolicyError] = []
    walked: set[str] = set()

    def unreadable(e: OSError) -> None:
        problems.append(PolicyError(f"cannot read this folder: {e.strerror or e.__class__.__name__}",
                                    file=e.filename))

    for folder, folders, names in os.walk(root, onerror=unreadable, followlinks=True):
        if os.path.realpath(folder) in walked:
            problems.append(PolicyError("this folder is reached twice (a link loop, or a folder linked from two "
                                        "places): link it once", file=folder))
            folders.clear()
            continue
        walked.add(os.path.realpath(folder))
        # Hidden files and folders (.github/, .git/, editor swap files) are not policies.
        folders[:] = [f for f in folders if not f.startswith(".")]
        for name in names:
            file = Path(folder, name)
            if name.startswith("."):
                continue
            if file.is_symlink() and not file.exists():   # a file's or a folder's: either may hold policies
                problems.append(PolicyError("a broken link", file=str(file)))
            elif os.path.splitext(name)[1].lower() not in (".yaml", ".yml"):
                continue
            elif file.is_file():
                found.append(file)
            else:
                problems.append(PolicyError("not a readable file", file=str(file)))
    _raise_all(problems)
    return sorted(found)


def load_policy(path: str | os.PathLike) -> Policy:
    """Load a file or a folder of YAML files; raises ``PolicyError`` naming every
    problem (``PolicyErrors`` when there are several)."""
    files = policy_files(path)
    if not files:
        raise PolicyError("no policy files (*.yaml, *.yml) found", file=str(path))
    docs, errors = [], []
    for file in files:
        try:
            docs.append(_parse_file(file))
        except PolicyError as e:
            errors.append(e)
    try:
        policy = parse_documents(docs, complete=not errors)
    except PolicyError as e:
        errors += e.errors
    _raise_all(errors)
    if not policy.tenants:
        # An empty or commented-out file: deployed, verify would deny everyone and the
        # drift repair would revoke every grant aadrun made. Removing services does that on purpose.
        raise PolicyError("no tenant is defined: the policies would deny every token and revoke every grant",
                          file=str(files[0]), field="tenants")
    return policy


def _raise_all(errors: list[PolicyError]) -> None:
    """Raise the errors found, if any, in file and line order."""
    if errors:
        errors = sorted(errors, key=lambda e: (e.file or "", e.line or 0))
        raise errors[0] if len(errors) == 1 else PolicyErrors(errors)
