"""The operator CLI (CONTRACT.md §8): ``scripts/aadrun COMMAND``.

Exit codes: 0 success, 1 a finding or a denial, 2 bad usage (argparse's own).
Every command takes ``--json`` for machine-readable output.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

from . import audit
from .config import Settings
from .errors import AadrunError, PolicyError
from .policy import load_policy, policy_files
from .tokens import STEPS

EXIT_OK, EXIT_FINDING, EXIT_USAGE = 0, 1, 2


def _emit(args, payload: dict, text: Callable[[dict], str]) -> None:
    print(json.dumps(payload, indent=2, default=str) if args.json else text(payload))


def cmd_validate(args, settings: Settings) -> int:
    path = args.policy or settings.policy_path
    try:
        policy = load_policy(path)
    except PolicyError as e:
        _emit(args, {"valid": False, "error": {"file": e.file, "line": e.line, "field": e.field,
                                               "message": e.message}},
              lambda p: f"error: {e}")
        return EXIT_FINDING
    payload = {"valid": True, "files": [str(f) for f in policy_files(path)], "tenants": sorted(policy.tenants),
               "services": sorted(policy.services)}
    _emit(args, payload, lambda p: f"ok: {len(p['files'])} file(s), {len(p['tenants'])} tenant(s), "
                                   f"{len(p['services'])} service(s): {', '.join(p['services'])}")
    return EXIT_OK


def _explain_token(args, app) -> dict:
    from .verify import log_decision

    decision = app.verifier.decide(args.service, args.token)
    log_decision(decision, args.token, mode="explain")
    order = ["unknown_service", "missing_token"] + [reason for reason, _ in STEPS] + ["rule"]
    labels = {"unknown_service": "service known to the policies", "missing_token": "a token present",
              **dict(STEPS), "rule": "a rule of the service matches"}
    failed_at = "rule" if decision.reason in ("not_member", "membership_unknown", "no_matching_rule") \
        else decision.reason
    steps, state = [], "pass"
    for step in order:
        if step == failed_at or (decision.reason == "unavailable" and step == "unknown_key" and state == "pass"):
            steps.append({"check": labels[step], "outcome": "fail", "reason": decision.reason})
            state = "skipped"
            continue
        outcome = state
        if step == "rule" and decision.allow:
            outcome = f"pass (rule {decision.rule}, via {decision.via})"
        steps.append({"check": labels[step], "outcome": outcome})
    return {**decision.body(), "status": decision.status, "steps": steps}


def _explain_user(args, app) -> dict:
    from .decide import decide

    policy = app.policy
    service = policy.services.get(args.service)
    if service is None:
        return {"allow": False, "reason": "unknown_service", "service": args.service, "subject": args.user}
    states = app.store.membership(service.tenant, args.user, service.groups) if service.groups else {}
    groups = []
    for group in service.groups:
        sync = app.store.sync_state(service.tenant, group)
        groups.append({"group": group, "member": states.get(group),
                       "synced_at": sync.synced_at.isoformat() if sync else None,
                       "source": "membership store (Microsoft Graph delta)" if sync else "never synced"})
    outcome = decide(service, tuple(args.role or ()), states)
    return {"allow": outcome.allow, "reason": outcome.reason, "service": service.name, "subject": args.user,
            "tenant": service.tenant, "rule": outcome.rule, "via": outcome.via, "groups": groups}


def cmd_explain(args, settings: Settings) -> int:
    from .app import App

    if bool(args.token) == bool(args.user):
        print("explain needs exactly one of --token or --user", file=sys.stderr)
        return EXIT_USAGE
    app = App(settings)
    payload = _explain_token(args, app) if args.token else _explain_user(args, app)

    def text(p: dict) -> str:
        lines = [f"{'ALLOW' if p['allow'] else 'DENY'} {p.get('service')}: {p['reason']}"]
        for step in p.get("steps", []):
            lines.append(f"  {step['outcome']:<8} {step['check']}" + (f"  [{step['reason']}]" if "reason" in step
                                                                        else ""))
        for group in p.get("groups", []):
            lines.append(f"  group {group['group']}: member={group['member']} ({group['source']}, "
                         f"synced {group['synced_at']})")
        if p.get("via"):
            lines.append(f"  allowed by rule {p['rule']} via {p['via']}")
        return "\n".join(lines)

    _emit(args, payload, text)
    return EXIT_OK if payload["allow"] else EXIT_FINDING


COMMANDS: dict[str, tuple[Callable, str]] = {
    "validate": (cmd_validate, "check the policy files"),
    "explain": (cmd_explain, "explain a decision for a token or a user"),
}


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="aadrun", description="aadrun operator CLI")
    sub = root.add_subparsers(dest="command", required=True)
    for name, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--json", action="store_true", help="machine-readable output")
        if name == "validate":
            p.add_argument("--policy", help="file or folder (default: AADRUN_POLICY_PATH or policies/)")
        if name == "explain":
            p.add_argument("--service", required=True)
            p.add_argument("--token", help="an access token to check")
            p.add_argument("--user", help="a user object id (decide from membership alone)")
            p.add_argument("--role", action="append", help="with --user: an app role the user holds")
    return root


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    audit.logger(sys.stderr)  # stdout carries the command's own output
    try:
        settings = Settings.from_env()
        return COMMANDS[args.command][0](args, settings)
    except AadrunError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FINDING
