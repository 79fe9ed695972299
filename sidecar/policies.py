"""Policies and the "match" stage: which policy, if any, governs a request.

A policy matches on host (exact, or ``*.suffix`` for any name below the suffix; the port is
ignored; no hosts means any host), a path prefix (on whole segments: ``/api`` matches ``/api``
and ``/api/x`` but not ``/apix``) and methods (none means any). Among several matches the
lowest ``priority`` number wins; ties go to the most specific (exact host, then the longest
wildcard suffix, then any host; then the longest path prefix), then to the name, so the
outcome never depends on storage order.

Matching is by index, not a scan: exact hosts in a dict, wildcard suffixes in a dict walked
label by label, so its cost grows with the labels of the host, not with the number of policies.

A policy may also name destination ports and TLS server names (SNI, exact or ``*.suffix``): it
then matches only requests that arrived on them. One that names them and nothing only HTTP has
(hosts, a path prefix, methods) also governs TCP connections (Envoy's network ext_authz filter
sends no HTTP request: ``PolicyIndex.match_connection``).
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

_HOST_LABELS = re.compile(r"^(\*\.)?([a-z0-9_-]+(\.[a-z0-9_-]+)*|\[[0-9a-f:.]+\])$")
_METHOD = re.compile(r"^[A-Z]+$")


class Policy(BaseModel):
    """A policy: what it matches, whether its rules run (the integration switch), and which
    rules, in order."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1, max_length=128)
    enabled: bool = True
    hosts: tuple[str, ...] = ()
    path_prefix: str = "/"
    methods: tuple[str, ...] = ()
    integration: bool = True
    priority: int = 100
    rules: tuple[str, ...] = ()
    ports: tuple[int, ...] = ()
    sni: tuple[str, ...] = ()
    mode: Literal["enforce", "audit"] = "enforce"
    """``audit``: the rules run as in ``enforce`` mode, but the request is allowed whatever they
    say; a would-be denial is recorded as such (``Decision.audit_deny``)."""

    @property
    def for_connections(self) -> bool:
        """Whether the policy governs TCP connections (Envoy's network ext_authz filter): it
        names destination ports or TLS server names, and nothing only HTTP has (hosts, a path
        prefix, methods) — else an HTTP policy on port 443 would decide for a database
        connection on 443 without its own rules."""
        return bool(self.ports or self.sni) and not self.hosts and self.path_prefix == "/" and not self.methods

    @property
    def restricted_to_arrival(self) -> bool:
        """Whether it matches only what arrived on its ports or TLS server names."""
        return bool(self.ports or self.sni)

    @field_validator("ports")
    @classmethod
    def _ports(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        for port in value:
            if not 1 <= port <= 65535:
                raise ValueError(f"port {port} must be 1-65535")
        return tuple(sorted(set(value)))

    @field_validator("sni")
    @classmethod
    def _sni(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        names = []
        for name in value:
            name = name.strip().lower()
            if not _HOST_LABELS.match(name) or name.startswith("["):
                raise ValueError(f"server name {name!r} must be a name (db.example.com) or a wildcard "
                                 "(*.example.com)")
            names.append(name)
        return tuple(names)

    @field_validator("hosts")
    @classmethod
    def _hosts(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        hosts = []
        for host in value:
            host = host.strip().lower()
            if not _HOST_LABELS.match(host):
                raise ValueError(f"host {host!r} must be a name (app.example.com), "
                                 "a wildcard (*.example.com) or an IP literal, without port")
            hosts.append(host)
        return tuple(hosts)

    @field_validator("path_prefix")
    @classmethod
    def _path_prefix(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError(f"path prefix {value!r} must start with /")
        return value

    @field_validator("methods")
    @classmethod
    def _methods(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        methods = tuple(m.strip().upper() for m in value)
        for method in methods:
            if not _METHOD.match(method):
                raise ValueError(f"method {method!r} is not an HTTP method")
        return methods

    @field_validator("rules")
    @classmethod
    def _unique_rules(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(value)) != len(value):
            raise ValueError("a rule may appear only once in a policy")
        return value


def split_host(authority: str) -> str:
    """The host of an authority, lower-cased, without port (``[v6]`` keeps its brackets)."""
    host = authority.strip().lower()
    if host.startswith("["):
        end = host.find("]")
        return host[: end + 1] if end != -1 else host
    if host.count(":") == 1:
        host = host.split(":", 1)[0]
    return host.rstrip(".")


def name_matches(patterns: tuple[str, ...], name: str) -> bool:
    """Whether ``name`` (lower-case) is one of ``patterns``: exact, or below a ``*.suffix``."""
    for pattern in patterns:
        if pattern.startswith("*."):
            if name.endswith(pattern[1:]) and len(name) > len(pattern) - 1:
                return True
        elif name == pattern:
            return True
    return False


def path_matches(prefix: str, path: str) -> bool:
    if prefix == "/" or path == prefix:
        return True
    if not path.startswith(prefix):
        return False
    return prefix.endswith("/") or path[len(prefix)] == "/"


def _arrived_on(policy: Policy, port: int, sni: str) -> bool:
    return (not policy.ports or port in policy.ports) and (not policy.sni or name_matches(policy.sni, sni.lower()))


def _first_match(bucket: tuple[Policy, ...], path: str, method: str, port: int, sni: str) -> Policy | None:
    for policy in bucket:
        if path_matches(policy.path_prefix, path) and (not policy.methods or method in policy.methods) and (
                not policy.restricted_to_arrival or _arrived_on(policy, port, sni)):
            return policy
    return None


# Specificity of how a policy matched the host: lower sorts first.
_EXACT, _WILDCARD, _ANY = 0, 1, 2


class PolicyIndex:
    """An immutable index of the enabled policies, built once per rules.db snapshot."""

    __slots__ = ("_any", "_by_name", "_connections", "_exact", "_wildcard", "size")

    def __init__(self, policies: Iterable[Policy]) -> None:
        exact: dict[str, list[Policy]] = defaultdict(list)
        wildcard: dict[str, list[Policy]] = defaultdict(list)
        any_host: list[Policy] = []
        size = 0
        for policy in policies:
            if not policy.enabled:
                continue
            size += 1
            if not policy.hosts:
                any_host.append(policy)
            for host in policy.hosts:
                if host.startswith("*."):
                    wildcard[host[2:]].append(policy)
                else:
                    exact[host].append(policy)
        # Each bucket is sorted so the first candidate that matches path and method is the best
        # one of its bucket.
        def order(bucket: list[Policy]) -> tuple[Policy, ...]:
            return tuple(sorted(bucket, key=lambda p: (p.priority, -len(p.path_prefix), p.name)))

        self._exact = {h: order(b) for h, b in exact.items()}
        self._wildcard = {h: order(b) for h, b in wildcard.items()}
        self._any = order(any_host)
        self._by_name = {p.name: p for p in (*self._any, *(p for b in self._exact.values() for p in b),
                                             *(p for b in self._wildcard.values() for p in b))}
        self._connections = tuple(sorted((p for p in self._by_name.values() if p.for_connections),
                                         key=lambda p: (p.priority, p.name)))
        self.size = size

    def named(self, name: str) -> Policy | None:
        """The enabled policy called ``name`` (an Envoy route binds it), or None."""
        return self._by_name.get(name)

    def match_connection(self, port: int, sni: str) -> Policy | None:
        """The policy governing a TCP connection to ``port`` (with TLS server name ``sni``, or
        ""), or None: among the policies that name ports or server names, the first by
        priority, then name, whose ports and names (each when set) hold. A policy that names
        neither is for HTTP only and never governs a connection."""
        return next((policy for policy in self._connections if _arrived_on(policy, port, sni)), None)

    def match(self, authority: str, path: str, method: str, *, port: int = 0, sni: str = "") -> Policy | None:
        """The policy governing a request, or None. ``path`` must exclude the query string; a
        policy that names ports or TLS server names matches only requests that arrived on one
        of them (``port``: the destination port; ``sni``: the TLS server name)."""
        host = split_host(authority)
        method = method.upper()
        # The best of each bucket is its first match (see __init__); across buckets the lowest
        # (priority, how the host matched, longer host suffix, longer path prefix, name).
        best = _first_match(self._exact.get(host, ()), path, method, port, sni)
        best_key = None if best is None else (best.priority, _EXACT, -len(host), -len(best.path_prefix), best.name)
        if self._wildcard:
            suffix = host
            while "." in suffix:
                suffix = suffix.split(".", 1)[1]
                found = _first_match(self._wildcard.get(suffix, ()), path, method, port, sni)
                if found is not None:
                    key = (found.priority, _WILDCARD, -len(suffix), -len(found.path_prefix), found.name)
                    if best_key is None or key < best_key:
                        best, best_key = found, key
        found = _first_match(self._any, path, method, port, sni)
        if found is not None and (
                best_key is None or (found.priority, _ANY, 0, -len(found.path_prefix), found.name) < best_key):
            return found
        return best
