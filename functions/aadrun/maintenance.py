"""maintenance's core (CONTRACT.md §1, §5-§7): the scheduled upkeep of aadrun.

    Maintenance(app)
      .handle(HttpRequest) -> HttpResponse    Cloud Scheduler's call
      .run(tasks) -> dict                     the same, for the CLI and tests

Tasks, run in this order whatever order they are asked in:

    subscriptions  Graph subscriptions cover every referenced group (subscriptions.py)
    reconcile      forget what the store holds of groups no policy names (nothing
                   keeps it current: a policy naming one again starts from a read);
                   delta read of every referenced group through policy_sync's own
                   path (``PolicySync.resync``): groups get no ``missed`` event, so a
                   lost notification is found here; removals apply at once, additions
                   as Graph confirms them, and IAM follows
    drift          each service's live IAM policy against the desired one: managed
                   members changed outside aadrun are restored, members aadrun does
                   not manage are reported and never touched; on a resource no
                   service names any more (service removed, ``cloud_run`` moved)
                   every member aadrun manages is revoked

Each task runs under the store lease ``maintenance/{task}``, renewed while the task
runs: of two overlapping runs, the second skips a task the first is running (status
``skipped``, reason ``lease_held``) rather than waiting for it, since the first does
the same work. A run that died (killed at the function's timeout) holds it for at
most ``LEASE_TTL_S`` more.

HTTP (POST, optional JSON body ``{"tasks": [...]}``; empty body = every task):

    every task ran or was skipped (lease held)   200   summary
    ...though some of a task's items failed      200   summary, "ok": false: the next
      (a group's read, a subscription,                 scheduled run tries them again; a
      a service's IAM)                                 retry would redo the whole run
    a task could not run, or all of its items    503   summary (Cloud Scheduler retries,
      failed (store, configuration, secret)            and shows the job failing)
    not POST                                     405   method_not_allowed
    body over 64 KiB                             413   too_large
    not a JSON object / unknown key / bad task   400   bad_request
    / a body cut off or its chunks malformed

A run's body is ``{"ok", "tasks": {name: {"status", ...}}}``, a refused request's
``{"error": REASON[, "detail"]}``; no error escapes as a 500: a task's failure is
caught and reported by its class and message.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence

from . import audit
from .coalesce import StoreLease
from .errors import AadrunError, RequestError, UpstreamError
from .graph import GraphClient
from .http import HttpRequest, HttpResponse
from .iam import IamWriter
from .managed_write import write_managed
from .plan import Binding, desired_on, entries_by_role, grant_of, iam_targets
from .policy import Policy
from .subscriptions import Subscriptions
from .sync_report import audit_changes

TASKS = ("subscriptions", "reconcile", "drift")
# Whether a task whose items failed got any done: a task that failed outright carries
# its own "error"; when every item failed (an expired client secret, a missing
# permission) the run failed too, and Cloud Scheduler must see it fail (503).
_PROGRESS: dict[str, Callable[[dict], bool]] = {
    # Some resource covered, or a subscription no longer wanted deleted. Not: a tenant
    # not reached, another URL's subscription, nor a deletion made for a create (a
    # replacement, a quota slot), which alone leaves its group uncovered.
    "subscriptions": lambda r: any(a["action"] not in ("error", "unreachable", "foreign", "deleted")
                                   or (a["action"] == "deleted" and not a.get("replacing"))
                                   for a in r.get("actions", ())),
    # Some group read: IAM that cannot be written anywhere is drift's failure to report.
    "reconcile": lambda r: sum(r.get("reads", {}).values()) > 0,
    "drift": lambda r: bool(r.get("services") or r.get("orphaned")),
}
MAX_BODY = 64 * 1024
# A task lease is renewed every third of this while its task runs, however long that
# is; a run that died (an instance killed at its timeout) blocks the task no longer.
LEASE_TTL_S = 90.0
IAM_LEASE_TTL_S, IAM_LEASE_WAIT_S = 30.0, 30.0
MAX_REPORTED_CHANGES = 100   # membership changes listed in a reconcile report


def _refused(status: int, reason: str, detail: str | None = None, headers: dict | None = None) -> HttpResponse:
    # A refused run is one that did not happen: the log says why.
    audit.entry("maintenance_refused", f"maintenance request refused: {reason}", severity="WARNING",
                reason=reason, detail=detail)
    body = {"error": reason, **({"detail": detail} if detail else {})}
    return HttpResponse.json(status, body, headers or {})


class Maintenance:
    """The maintenance tasks of one instance; ``graph_factory`` and ``iam_writer``
    default to the real clients built from ``app.settings``."""

    def __init__(self, app, *, graph_factory: Callable[[str], GraphClient] | None = None,
                 iam_writer: IamWriter | None = None, subscriptions: Subscriptions | None = None):
        self._app = app
        self._graph_factory = graph_factory or (lambda tenant: GraphClient(app.settings, tenant))
        self._graphs: dict[str, GraphClient] = {}
        self._iam = iam_writer
        self._subscriptions = subscriptions
        self._holder = f"{socket.gethostname()}:{os.getpid()}:{os.urandom(4).hex()}"
        self._runs = itertools.count(1)
        self._lock = threading.Lock()   # request threads share the lazily built clients
        self._tasks: dict[str, Callable[[], dict]] = {
            "subscriptions": self.subscriptions_task, "reconcile": self.reconcile_task, "drift": self.drift_task}

    # -- entry points ---------------------------------------------------------------

    def handle(self, req: HttpRequest) -> HttpResponse:
        """Cloud Scheduler's POST (statuses in the module docstring)."""
        if req.method != "POST":
            return _refused(405, "method_not_allowed", headers={"Allow": "POST"})
        if req.body_too_large or len(req.body) > MAX_BODY:
            return _refused(413, "too_large")
        if req.body_incomplete:   # a cut-off body must not run every task, as an empty one does
            return _refused(400, "bad_request", "the request body ended before its declared length, or its "
                                                "chunks are malformed")
        try:
            tasks = parse_tasks(req.body)
        except RequestError as e:
            return _refused(400, "bad_request", str(e))
        summary = self.run(tasks)
        failed = any(r["status"] == "error" and ("error" in r or not _PROGRESS[name](r))
                     for name, r in summary["tasks"].items())
        return HttpResponse.json(503 if failed else 200, summary)

    def run(self, tasks: Sequence[str] | None = None) -> dict:
        """Run ``tasks`` (default: all) in the order of ``TASKS``, each under its lease."""
        unknown = sorted(set(tasks or ()) - set(TASKS))
        if unknown:
            raise RequestError(f"unknown task (tasks: {', '.join(TASKS)})")
        chosen = [t for t in TASKS if tasks is None or t in tasks]
        holder = f"{self._holder}:{next(self._runs)}"
        results = {name: self._task(name, holder) for name in chosen}
        ok = all(r["status"] != "error" for r in results.values())
        audit.entry("maintenance", "maintenance run", severity="INFO" if ok else "ERROR",
                    tasks={n: r["status"] for n, r in results.items()})
        return {"ok": ok, "tasks": results}

    def _task(self, name: str, holder: str) -> dict:
        started = time.monotonic()
        try:
            with self.lease(name, holder) as held:
                result = {"status": "ok", **self._tasks[name]()} if held else {"status": "skipped",
                                                                                "reason": "lease_held"}
        except AadrunError as e:
            audit.entry("maintenance_error", f"maintenance task {name} failed", severity="ERROR",
                        error=type(e).__name__, detail=str(e))
            result = {"status": "error", "error": e.reason, "detail": str(e)}
        except Exception as e:  # noqa: BLE001 - the scheduler gets a summary, never a stack trace
            audit.entry("maintenance_error", f"maintenance task {name} failed", severity="ERROR",
                        error=type(e).__name__)
            result = {"status": "error", "error": "internal", "detail": "unexpected error"}
        if result["status"] == "ok" and result.get("errors"):
            result["status"] = "error"
        result["seconds"] = round(time.monotonic() - started, 3)
        return result

    @contextlib.contextmanager
    def lease(self, task: str, holder: str | None = None) -> Iterator[bool]:
        """Hold ``maintenance/{task}`` for the block; yields False (and holds nothing)
        when another run has it. The CLI's ``resync`` shares the reconcile lease."""
        store, name = self._app.store, f"maintenance/{task}"
        holder = holder or f"{self._holder}:{next(self._runs)}"
        if not store.acquire_lease(name, holder, LEASE_TTL_S):
            yield False
            return
        done = threading.Event()

        def keep() -> None:
            # A held lease means a live run: renewed while the task works, it expires
            # soon after a run that died, instead of blocking the task for long.
            while not done.wait(LEASE_TTL_S / 3):
                try:
                    if not store.renew_lease(name, holder, LEASE_TTL_S):
                        audit.entry("maintenance_lease_lost", f"lease {name} was taken over", severity="WARNING",
                                    task=task)
                        return
                except AadrunError:   # the store did not answer: try again at the next beat
                    continue

        keeper = threading.Thread(target=keep, name=f"aadrun-lease-{task}", daemon=True)
        keeper.start()
        try:
            yield True
        finally:
            done.set()
            keeper.join()
            with contextlib.suppress(AadrunError):   # it expires on its own
                store.release_lease(name, holder)

    # -- tasks ------------------------------------------------------------------------

    def subscriptions_task(self) -> dict:
        """Subscriptions for every referenced group; per-resource actions and their counts."""
        actions = self.subscriptions.ensure(self._app.policy.referenced_groups())
        counts: dict[str, int] = {}
        for a in actions:
            counts[a["action"]] = counts.get(a["action"], 0) + 1
        return {"counts": counts, "actions": actions,
                "errors": [a for a in actions if a["action"] in ("error", "foreign")]}

    def reconcile_task(self) -> dict:
        """``PolicySync.resync`` per tenant, so one tenant's failure spares the others."""
        out = {"groups": 0, "reads": {}, "added": 0, "removed": 0, "changes": [], "iam": {}, "refused": {},
               "errors": [], "forgotten": []}
        try:
            out["forgotten"], failed = self._app.sync.forget_unreferenced()
            out["errors"] += failed
        except AadrunError as e:   # the store's list of groups
            out["errors"].append({"error": e.reason, "detail": str(e)})
        for tenant, groups in sorted(self._app.policy.referenced_groups().items()):
            if not groups:
                continue
            try:
                merge_resync(out, self._app.sync.resync(tenant=tenant, raise_errors=False).to_json(), tenant=tenant)
            except AadrunError as e:
                out["errors"].append({"tenant": tenant, "error": e.reason, "detail": str(e)})
        return out

    def drift_task(self) -> dict:
        """Every service with ``cloud_run``: restored / removed managed members, unmanaged
        ones; and every orphaned resource (``orphaned``): its managed members revoked."""
        writer = self.iam_writer
        if writer.mode == "record":
            return {"mode": "record", "services": {}, "orphaned": {},
                    "note": "AADRUN_IAM=record: no live policy to compare"}
        policy, reports, errors = self._app.policy, {}, []
        for name, resource in iam_targets(policy, self._app.store.managed_targets()):
            try:
                reports[name or resource] = self._drift(policy, name, resource)
            except AadrunError as e:
                errors.append({"service": name or resource, "error": e.reason, "detail": str(e)})
                # The run may still answer 200, and Scheduler keeps no answer: the log must say it.
                audit.entry("maintenance_item_failed", f"drift of {name or resource} failed", severity="ERROR",
                            task="drift", service=name, cloud_run=resource, error=e.reason, detail=str(e))
        services = {k: r for k, r in reports.items() if k in policy.services}
        orphaned = {k: r for k, r in reports.items() if k not in policy.services}
        repaired = sorted(k for k, r in reports.items() if r["restored"] or r["removed"])
        return {"mode": writer.mode, "services": services, "orphaned": orphaned, "repaired": repaired,
                "errors": errors}

    # -- drift ------------------------------------------------------------------------

    def _drift(self, policy: Policy, name: str | None, resource: str) -> dict:
        """One resource, for service ``name`` or, with None, as an orphan: the report
        of its live policy, and the repair of managed members (the write policy_sync
        makes, ``managed_write``, under the same ``iam/{resource}`` lease)."""
        store = self._app.store
        why = "IAM drift repaired" if name else "no service names this resource any more"
        with StoreLease(store, f"iam/{resource}", f"{self._holder}:drift:{next(self._runs)}",
                        ttl=IAM_LEASE_TTL_S, wait=IAM_LEASE_WAIT_S) as lease:
            if name and store.adopt_managed(name, resource):   # kept by service name before
                audit.entry("managed_adopted", f"managed members of {name} now kept under {resource}",
                            service=name, cloud_run=resource)
            try:
                written = write_managed(store, self.iam_writer, lease, resource,
                                        lambda: desired_on(policy, resource, store.group_members) if name else {},
                                        service=name or "", source="maintenance", why=why, repair=True)
            except UpstreamError as e:
                if name or e.status_code != 404:
                    raise
                return self._forget_deleted(resource, lease.key)
        found = unmanaged(written.live or [], written.managed_before)
        if written.refused_outright:
            return {"cloud_run": resource, "refused": written.refusal, "restored": {}, "removed": {},
                    "unmanaged": found}
        changes = written.result.changes
        report = {"cloud_run": resource, "restored": _sorted(changes.adds), "removed": _sorted(changes.removes),
                  "unmanaged": found, "principals": changes.principals}
        return {**report, "refused": written.refusal} if written.refusal else report

    def _forget_deleted(self, resource: str, lease: tuple[str, str]) -> dict:
        """An orphaned resource whose Cloud Run service was deleted (404): its bindings went
        with it, so what aadrun kept as managed there is dropped, not retried forever."""
        store = self._app.store
        forgotten = store.managed_members(resource)
        audit_changes(store.record_iam(resource, {}, source="maintenance",
                                       why="its Cloud Run service no longer exists", lease=lease))
        audit.entry("iam_target_gone", f"{resource} no longer exists: its managed members are forgotten",
                    cloud_run=resource, forgotten=_sorted(forgotten))
        return {"cloud_run": resource, "gone": True, "restored": {}, "removed": {}, "unmanaged": [],
                "forgotten": _sorted(forgotten)}

    # -- clients ----------------------------------------------------------------------

    @property
    def subscriptions(self) -> Subscriptions:
        with self._lock:
            if self._subscriptions is None:
                self._subscriptions = Subscriptions(self._app.settings, self._app.store, self.graph)
            return self._subscriptions

    def graph(self, tenant: str) -> GraphClient:
        """The tenant's Graph client, built once (MSAL caches its token per client)."""
        with self._lock:
            if tenant not in self._graphs:
                self._graphs[tenant] = self._graph_factory(tenant)
            return self._graphs[tenant]

    @property
    def iam_writer(self) -> IamWriter:
        with self._lock:
            if self._iam is None:
                self._iam = IamWriter(self._app.settings)
            return self._iam


def parse_tasks(body: bytes) -> list[str] | None:
    """The tasks a request body selects: None (all) for an empty body or one without
    ``tasks``; RequestError for anything but ``{"tasks": [known task, ...]}``."""
    if not body.strip():
        return None
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        raise RequestError("body is not JSON") from None
    if not isinstance(data, dict):
        raise RequestError("body must be a JSON object")
    extra = sorted(set(data) - {"tasks"})
    if extra:
        raise RequestError("unknown field (allowed: tasks)")
    tasks = data.get("tasks")
    if tasks is None:
        return None
    if not isinstance(tasks, list) or not tasks or not all(isinstance(t, str) for t in tasks):
        raise RequestError("tasks must be a non-empty list of task names")
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        raise RequestError(f"unknown task (tasks: {', '.join(TASKS)})")
    return tasks


def unmanaged(live: Sequence[Binding], managed: Mapping[str, set[str]]) -> list[dict]:
    """Bindings (or the parts of them) aadrun does not manage: reported, never touched.
    A conditional binding is never aadrun's."""
    out = []
    entries = entries_by_role(live)
    for b in live:
        mine = managed.get(b.role, set()) if b.condition is None else set()
        members = sorted({m for m in b.members if not grant_of(m, mine, entries.get(b.role, ()))})
        if members:
            entry = {"role": b.role, "members": members}
            if b.condition is not None:
                entry["condition"] = dict(b.condition)
            out.append(entry)
    return out


def merge_resync(out: dict, summary: Mapping, **where: str) -> None:
    """Fold one ``SyncSummary.to_json()`` into a reconcile report; ``where`` (tenant,
    group) goes into each of its errors."""
    out["groups"] += len(summary.get("groups", ()))
    for kind, n in summary.get("reads", {}).items():
        out["reads"][kind] = out["reads"].get(kind, 0) + n
    out["added"] += summary.get("added", 0)
    out["removed"] += summary.get("removed", 0)
    for e in summary.get("membership", ())[:max(MAX_REPORTED_CHANGES - len(out["changes"]), 0)]:
        out["changes"].append({k: e[k] for k in ("kind", "tenant", "group", "user")})
    for name, applied in summary.get("iam", {}).items():
        if applied.get("changes"):
            out["iam"][name] = applied["changes"]
    out["refused"].update(summary.get("refused", {}))
    out["errors"] += [{**where, "error": e} for e in summary.get("errors", ())]


def _sorted(mapping: Mapping[str, frozenset[str]]) -> dict[str, list[str]]:
    return {role: sorted(m) for role, m in sorted(mapping.items())}


__all__ = ["Maintenance", "TASKS", "parse_tasks", "unmanaged", "merge_resync"]
