"""Identity-provider and clock scenarios of ``scripts/chaos``.

    jwks_down    the JWKS and discovery endpoints down for "hours" of refresh cycles:
                 time is compressed by serving verify with AADRUN_JWKS_REFRESH_SECONDS=2
                 (the hourly refresh every 2 s, so 20 s of outage span 10 refresh
                 cycles, i.e. 10 h at the real interval); known keys keep verifying,
                 a key rotated during the outage is refused (never allowed), a verify
                 started during the outage fails closed (503), and the rotated key is
                 accepted once the endpoint is back (the time to converge)
    clock_skew   tokens whose clocks are ahead or behind by less and more than the
                 60 s leeway, through verify over HTTP, and verify's own clock skewed
                 against fresh tokens (in process)
"""
from __future__ import annotations

import dataclasses
import time
from collections import Counter
from pathlib import Path

from chaos_lab import SERVICES, TENANT, Lab, Row, group_id, mallory_id, user_id
from tests.support.devidp import SigningKey
from aadrun.store import GroupUpdate, SyncState, utcnow

LEEWAY = 60


def _seed(lab: Lab) -> str:
    """One member of group 0 (service 0) in the store and in Graph's truth."""
    member = user_id(0)
    lab.truth[group_id(0)].add(member)
    lab.store.apply(GroupUpdate(TENANT, group_id(0), replace=frozenset({member}), sync=SyncState(None, utcnow()),
                                source="chaos"))
    return member


def jwks_down(folder: Path, quick: bool = False) -> tuple[Row, Lab]:
    lab = Lab(folder, extra_env={"AADRUN_JWKS_REFRESH_SECONDS": "2"})
    member = _seed(lab)
    lab.verify = lab.function("verify", AADRUN_AUTHORITY_URL=lab.idp.url)
    expect = Counter()
    wrong = 0
    assert lab.verify_status(member, 0) == 200, lab.logs()[-2000:]
    lab.idp.down = True
    old = lab.idp.current
    rotated = lab.idp.rotate()                      # a new key the verifier cannot fetch now
    fresh = lab.function("verify", AADRUN_AUTHORITY_URL=lab.idp.url)   # started during the outage
    outage = 6 if quick else 20
    until = time.monotonic() + outage
    while time.monotonic() < until:
        cases = [(lab.verify.port, dict(key=old), 200),                              # cached key: still verifies
                 (lab.verify.port, dict(key=rotated), 401),                          # unknown kid: refused
                 (lab.verify.port, dict(key=SigningKey(kid=old.kid)), 401),          # forged with a known kid
                 (fresh.port, dict(key=old), 503)]                                   # never fetched: fail closed
        for port, mint, status in cases:
            got = _status(lab, port, member, **mint)
            expect[(status, got)] += 1
            wrong += got != status
        time.sleep(0.2)
    lab.idp.down = False
    back = time.monotonic()
    converge = None
    while time.monotonic() - back < 30:
        if _status(lab, lab.verify.port, member, key=rotated) == 200 and \
                _status(lab, fresh.port, member, key=rotated) == 200:
            converge = time.monotonic() - back
            break
        time.sleep(0.1)
    messages = sum(expect.values())
    note = f"{outage} s down = {outage // 2} refresh cycles; " + \
        ", ".join(f"want {w} got {g}: {n}" for (w, g), n in sorted(expect.items()))
    return Row("JWKS endpoint down (compressed hours)", messages, 0, wrong, converge, note), lab


def _status(lab: Lab, port: int, user: str, service: int = 0, **mint) -> int:
    import json

    token = lab.idp.mint(TENANT, oid=user, aud=f"api://svc-{service}", **mint)
    lab.secrets.add(token)
    return lab.call(port, "/verify", json.dumps({"service": f"svc-{service}"}).encode(),
                    {"Authorization": f"Bearer {token}"})[0]


# (case, seconds the token's issuer clock is ahead (+) or behind (-), lifetime, expected status)
SKEWS = [
    ("issuer 30 s ahead (nbf in the future, within leeway)", 30, 3600, 200),
    ("issuer 59 s ahead", 59, 3600, 200),
    ("issuer 120 s ahead (beyond leeway)", 120, 3600, 401),
    ("issuer 1 h ahead", 3600, 3600, 401),
    ("expired 30 s ago (within leeway)", -3630, 3600, 200),
    ("expired 120 s ago (beyond leeway)", -3720, 3600, 401),
]


def clock_skew(folder: Path, quick: bool = False) -> tuple[Row, Lab]:
    lab = Lab(folder)
    member = _seed(lab)
    lab.verify = lab.function("verify", AADRUN_AUTHORITY_URL=lab.idp.url)
    wrong = checks = 0
    rounds = 2 if quick else 10
    for _ in range(rounds):
        for case, skew, lifetime, status in SKEWS:
            for user, allowed in ((member, status), (mallory_id(0), 403 if status == 200 else status)):
                got = _status(lab, lab.verify.port, user, now=time.time() + skew, lifetime=lifetime)
                checks += 1
                wrong += got != allowed
    wrong_local, n_local = _skewed_verifier(lab, member, rounds)
    return Row("clock skew within / beyond the 60 s leeway", checks + n_local, 0, wrong + wrong_local, 0.0,
               f"{len(SKEWS)} token skews over HTTP, 4 verifier skews in process"), lab


def _skewed_verifier(lab: Lab, member: str, rounds: int) -> tuple[int, int]:
    """verify's own clock ahead or behind fresh tokens (Verifier with a skewed clock)."""
    from aadrun.config import Settings
    from aadrun.keys import KeyCache
    from aadrun.policy import load_policy
    from aadrun.verify import Verifier

    settings = dataclasses.replace(Settings(), authority_url=lab.idp.url, store_url=lab.store_url,
                                   policy_path=str(lab.folder / "policy.yaml"))
    policy = load_policy(settings.policy_path)
    keys = KeyCache(settings)
    wrong = n = 0
    lifetime = 3600
    for skew, reason in ((-30, "ok"), (-(LEEWAY + 60), "not_yet_valid"),
                         (lifetime + 30, "ok"), (lifetime + LEEWAY + 60, "expired")):
        verifier = Verifier(settings, lambda: policy, keys, lambda: lab.store, clock=lambda s=skew: time.time() + s)
        for _ in range(rounds * 3):
            token = lab.idp.mint(TENANT, oid=member, aud="api://svc-0", lifetime=lifetime)
            n += 1
            wrong += verifier.decide("svc-0", token).reason != reason
    return wrong, n


__all__ = ["jwks_down", "clock_skew", "SERVICES"]
