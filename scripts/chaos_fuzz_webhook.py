"""The webhook fuzz of tests/test_webhook.py at ``AADRUN_FUZZ_EXAMPLES`` examples per
test (``scripts/chaos --fuzz``): the same strategies and checks, a longer run.

Random bodies get only 202, 400 or 413 and publish nothing unless 202; items with a
wrong client state are never published; authentic items of any shape never fail a
request and publish only messages of a policy tenant that survive a round trip.
"""
from __future__ import annotations

import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aadrun.messages import from_json
from tests.test_webhook import STATE, TENANT, Recorder, any_items, forged_items, json_values, make_webhook, post

EXAMPLES = int(os.environ.get("AADRUN_FUZZ_EXAMPLES", "150"))
long_fuzz = settings(max_examples=EXAMPLES, deadline=None, database=None,
                     suppress_health_check=[HealthCheck.too_slow])


@long_fuzz
@given(body=st.binary(max_size=4096) | json_values.map(lambda v: __import__("json").dumps(v).encode()))
def test_random_bodies(body):
    recorder = Recorder()
    response = post(make_webhook(recorder), body)
    assert response.status in (202, 400, 413)
    assert recorder.batches == [] or response.status == 202


@long_fuzz
@given(items=st.lists(forged_items | json_values, max_size=8))
def test_forged_items_are_never_published(items):
    recorder = Recorder()
    assert post(make_webhook(recorder), {"value": items}).status in (202, 400)
    assert recorder.batches == []


@long_fuzz
@given(items=st.lists(any_items.map(lambda d: {**d, "clientState": STATE}), max_size=8))
def test_authentic_items_never_fail(items):
    recorder = Recorder()
    assert post(make_webhook(recorder), {"value": items}).status == 202
    for message in recorder.messages:
        assert message.tenant == TENANT and from_json(message.to_json()) == message
