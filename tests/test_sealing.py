"""The shared cache's pure parts, table-driven: names and sealed values (``sealing``), the
circuit breaker, and what the fleet shares of an outcome (``sidecar.rules.fleet``)."""

from __future__ import annotations

import pytest

from sidecar.decision import Code
from sidecar.rules.fleet import decode, encode, request_material
from sidecar.rules.judge import RuleOutcome
from sidecar.rules.templates import WebhookRequest
from sidecar.shared_cache import Breaker
from sidecar.shared_cache.sealing import MIN_SECRET_BYTES, NAME_BYTES, OVERHEAD, FleetKeys, Rejected
from tests.helpers import FakeClock

SECRET = b"s" * MIN_SECRET_BYTES
NOW = 1_800_000_000_000  # ms since the epoch
LATER = NOW + 60_000


def keys(secret: bytes = SECRET) -> FleetKeys:
    return FleetKeys(secret)


# ------------------------------------------------------------------------------------ names

def test_a_name_is_a_keyed_hash_of_its_material() -> None:
    name = keys().name(b"rule|GET|https://hr.example/u?alice")
    assert len(name) == NAME_BYTES
    assert name == keys().name(b"rule|GET|https://hr.example/u?alice")  # every pod names it alike
    assert name != keys().name(b"rule|GET|https://hr.example/u?alicf")
    assert name != keys(b"t" * MIN_SECRET_BYTES).name(b"rule|GET|https://hr.example/u?alice")
    assert b"alice" not in name


@pytest.mark.parametrize("length", [0, 1, MIN_SECRET_BYTES - 1])
def test_a_short_secret_is_refused(length: int) -> None:
    with pytest.raises(ValueError, match=f"at least {MIN_SECRET_BYTES} bytes \\(it is {length}\\)"):
        FleetKeys(b"k" * length)


# ---------------------------------------------------------------------------------- sealing

NAME = keys().name(b"alice's entry")
OTHER_NAME = keys().name(b"mallory's entry")
SEALED = keys().seal(NAME, b'{"allow": true}', LATER)


def test_a_sealed_value_opens_for_its_name_until_its_expiry() -> None:
    assert keys().open(NAME, SEALED, NOW) == (b'{"allow": true}', LATER)
    assert len(SEALED) == OVERHEAD + len(b'{"allow": true}')
    assert b"allow" not in SEALED
    assert keys().seal(NAME, b'{"allow": true}', LATER) != SEALED  # a salt of its own each time


def _flip(data: bytes, index: int) -> bytes:
    flipped = bytearray(data)
    flipped[index] ^= 0x01
    return bytes(flipped)


@pytest.mark.parametrize(("what", "name", "sealed", "now", "reason"), [
    ("moved to another entry", OTHER_NAME, SEALED, NOW, "forged"),
    ("another fleet's secret", NAME, keys(b"t" * MIN_SECRET_BYTES).seal(NAME, b"x", LATER), NOW, "forged"),
    ("salt altered", NAME, _flip(SEALED, 1), NOW, "forged"),
    ("expiry pushed back", NAME, _flip(SEALED, 1 + 16 + 7), NOW, "forged"),
    ("ciphertext altered", NAME, _flip(SEALED, 1 + 16 + 8), NOW, "forged"),
    ("tag altered", NAME, _flip(SEALED, len(SEALED) - 1), NOW, "forged"),
    ("truncated", NAME, SEALED[:-1], NOW, "forged"),
    ("replayed at its expiry", NAME, SEALED, LATER, "expired"),
    ("replayed after its expiry", NAME, SEALED, LATER + 1, "expired"),
    ("another format", NAME, b"\x02" + SEALED[1:], NOW, "malformed"),
    ("shorter than any value", NAME, SEALED[:OVERHEAD - 1], NOW, "malformed"),
    ("empty", NAME, b"", NOW, "malformed"),
    ("plain text", NAME, b'{"allow": true, "padding": "..........................."}', NOW, "malformed"),
])
def test_a_value_that_fails_verification_is_rejected(what: str, name: bytes, sealed: bytes, now: int,
                                                     reason: str) -> None:
    with pytest.raises(Rejected) as info:
        keys().open(name, sealed, now)
    assert info.value.reason == reason, what


# ---------------------------------------------------------------------------------- breaker

def test_the_breaker_opens_after_failures_in_a_row_and_probes_once_it_has_waited() -> None:
    clock = FakeClock()
    breaker = Breaker(5.0, failures=3, clock=clock)
    steps: list[str] = []
    for _ in range(2):
        assert breaker.allow()
        assert not breaker.failed()
    assert breaker.allow() and not breaker.succeeded()  # a success: the count starts again
    for _ in range(2):
        assert breaker.allow() and not breaker.failed()
    assert breaker.allow() and breaker.failed()  # the third in a row opens it
    steps.append(breaker.state)
    clock.advance(4.9)
    steps.append(f"{breaker.allow()}")
    clock.advance(0.2)
    steps += [f"{breaker.allow()}", breaker.state, f"{breaker.allow()}"]  # one probe, the others wait
    assert breaker.failed()  # the probe failed: open again, for another 5 s
    steps += [breaker.state, f"{breaker.allow()}"]
    clock.advance(5.1)
    assert breaker.allow()
    breaker.abandoned()  # the probe's caller left: the next operation probes
    assert breaker.allow() and breaker.succeeded()
    steps += [breaker.state, f"{breaker.allow()}"]
    assert steps == ["open", "False", "True", "half_open", "False", "open", "False", "closed", "True"]
    assert breaker.trips == 2


# ------------------------------------------------------------------------ what the fleet shares

@pytest.mark.parametrize("outcome", [
    RuleOutcome(None, {"tier": "gold", "group": "ünïcode"}),
    RuleOutcome((Code.VALUE_MISMATCH, 'rule "posture": status is "locked"'), {}, 0),
    RuleOutcome((Code.WEBHOOK_TIMEOUT, 'rule "posture": no answer within 1000 ms'), {}),
])
def test_an_outcome_survives_the_fleet(outcome: RuleOutcome) -> None:
    assert decode(encode(outcome, "app-7f9c-x2")) == (outcome, "app-7f9c-x2")


@pytest.mark.parametrize("value", [
    b"", b"not json", b"[]", b'["pod", "no_such_code", "reason", {}, null]', b'["pod", null, null, [], null]',
    b'["pod", null, null, {"tier": 1}, null]', b'[1, null, null, {}, null]', b'["pod", "key_missing", 5, {}, null]',
    b'["pod", null, null, {}, "0"]', b'{"pod": "p"}',
])
def test_a_shape_this_release_does_not_write_is_not_used(value: bytes) -> None:
    assert decode(value) is None


def test_every_part_of_a_request_names_its_entry() -> None:
    base = WebhookRequest("POST", "https://hr.example/u", (("x-user", "alice"),), b"{}")
    variants = [
        base,
        WebhookRequest("GET", "https://hr.example/u", (("x-user", "alice"),), b"{}"),
        WebhookRequest("POST", "https://hr.example/v", (("x-user", "alice"),), b"{}"),
        WebhookRequest("POST", "https://hr.example/u", (("x-user", "alicf"),), b"{}"),
        WebhookRequest("POST", "https://hr.example/u", (("x-usex", "alice"),), b"{}"),
        WebhookRequest("POST", "https://hr.example/u", (("x-user", "alice"), ("a", "")), b"{}"),
        WebhookRequest("POST", "https://hr.example/u", (("x-user", "alice"),), b"{ }"),
        WebhookRequest("POST", "https://hr.example/u", (("x-user", "alice"),), None),
        WebhookRequest("POST", "https://hr.example/u", (("x-user", "alice"),), b""),
        # Parts that run together alike must not meet: lengths are part of the encoding.
        WebhookRequest("POST", "https://hr.example/u", (("x-usera", "lice"),), b"{}"),
    ]
    materials = {request_material(b"fingerprint-1", r) for r in variants}
    assert len(materials) == len(variants)
    assert request_material(b"fingerprint-2", base) not in materials  # an edited rule: other entries
