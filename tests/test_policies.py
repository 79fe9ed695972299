"""Policy matching: table-driven, on plain values."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from sidecar.policies import Policy, PolicyIndex, split_host

POLICIES = [
    Policy(name="exact", hosts=("app.example.com",), path_prefix="/api", priority=100),
    Policy(name="wild", hosts=("*.example.com",), priority=100),
    Policy(name="deep-wild", hosts=("*.eu.example.com",), priority=100),
    Policy(name="any-admin", path_prefix="/admin", methods=("POST", "DELETE"), priority=100),
    Policy(name="urgent", hosts=("urgent.example.com",), path_prefix="/", priority=1),
    Policy(name="urgent-any", path_prefix="/urgent", priority=1),
    Policy(name="disabled", hosts=("off.example.org",), enabled=False),
    Policy(name="v6", hosts=("[::1]",)),
]


@pytest.mark.parametrize(
    ("authority", "path", "method", "expected"),
    [
        ("app.example.com", "/api", "GET", "exact"),
        ("app.example.com", "/api/v1/users", "GET", "exact"),
        ("APP.Example.COM:8443", "/api/x", "get", "exact"),  # case and port ignored
        ("app.example.com", "/apix", "GET", "wild"),  # prefixes match whole segments
        ("app.example.com", "/", "GET", "wild"),
        ("other.example.com", "/api", "GET", "wild"),
        ("a.b.example.com", "/", "GET", "wild"),
        ("x.eu.example.com", "/", "GET", "deep-wild"),  # the longest suffix is more specific
        ("example.com", "/", "GET", None),  # *.example.com does not cover example.com itself
        ("elsewhere.org", "/admin/users", "POST", "any-admin"),
        ("elsewhere.org", "/admin/users", "GET", None),  # method not listed
        ("app.example.com", "/admin", "DELETE", "wild"),  # exact/wildcard host beats any host
        ("urgent.example.com", "/api", "GET", "urgent"),
        ("app.example.com", "/urgent/x", "GET", "urgent-any"),  # priority beats specificity
        ("off.example.org", "/", "GET", None),  # disabled policies never match
        ("[::1]:8080", "/", "GET", "v6"),
        ("", "/", "GET", None),
    ],
)
def test_match(authority: str, path: str, method: str, expected: str | None) -> None:
    policy = PolicyIndex(POLICIES).match(authority, path, method)
    assert (policy.name if policy else None) == expected


def test_ties_are_broken_by_name_not_storage_order() -> None:
    a = Policy(name="a", hosts=("h.example",))
    b = Policy(name="b", hosts=("h.example",))
    assert PolicyIndex([b, a]).match("h.example", "/", "GET").name == "a"
    assert PolicyIndex([a, b]).match("h.example", "/", "GET").name == "a"


def test_longer_path_prefix_wins_at_equal_priority() -> None:
    index = PolicyIndex([Policy(name="root"), Policy(name="deep", path_prefix="/a/b/")])
    assert index.match("h", "/a/b/c", "GET").name == "deep"
    assert index.match("h", "/a/c", "GET").name == "root"


@pytest.mark.parametrize(
    ("authority", "host"),
    [("Example.com:80", "example.com"), ("[::1]:9", "[::1]"), ("example.com.", "example.com"), ("::1", "::1")],
)
def test_split_host(authority: str, host: str) -> None:
    assert split_host(authority) == host


@pytest.mark.parametrize(
    "bad",
    [{"hosts": ("app.example.com:8080",)}, {"hosts": ("a.*.example.com",)}, {"path_prefix": "api"},
     {"methods": ("G E T",)}, {"rules": ("r", "r")}],
)
def test_invalid_policies_are_refused(bad: dict) -> None:
    with pytest.raises(ValidationError):
        Policy(name="p", **bad)


def test_matching_does_not_scan_all_policies() -> None:
    many = [Policy(name=f"p{i}", hosts=(f"h{i}.example.com",)) for i in range(20_000)]
    index = PolicyIndex(many)
    assert index.size == 20_000
    assert index.match("h19999.example.com", "/", "GET").name == "p19999"
    assert index.match("nope.example.com", "/", "GET") is None


def test_an_http_policy_on_a_port_never_governs_a_connection() -> None:
    """A policy for https://www on :443 must not decide for a database connection on :443."""
    web = Policy(name="public-web", hosts=("www.example.com",), path_prefix="/public", methods=("GET",),
                 ports=(443,), integration=False, priority=10)
    database = Policy(name="db", sni=("db.example.com",), rules=("mfa",), priority=100)
    index = PolicyIndex([web, database])
    assert index.match_connection(443, "db.example.com") is database
    assert index.match_connection(443, "other.example.com") is None
    # On HTTP the ports restrict it: only requests that arrived on 443.
    assert index.match("www.example.com", "/public/a", "GET", port=443) is web
    assert index.match("www.example.com", "/public/a", "GET", port=8080) is None


def test_a_port_only_policy_governs_connections_without_a_server_name() -> None:
    """Plain TCP (no TLS, so no SNI), as for an SSH or PostgreSQL port."""
    postgres = Policy(name="postgres", ports=(5432,), rules=("mfa",))
    index = PolicyIndex([postgres, Policy(name="web", path_prefix="/")])
    assert index.match_connection(5432, "") is postgres
    assert index.match_connection(5432, "db.example.com") is postgres  # no sni named: any
    assert index.match_connection(22, "") is None
