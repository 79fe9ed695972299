"""The server's settings: flags of ``safous-sidecar serve`` or ``SAFOUS_*`` environment variables.

One model defines both: each field is a flag (``--default-action``) and an environment
variable (``SAFOUS_DEFAULT_ACTION``); a flag wins over the variable, which wins over the
default. Values are validated at start and a bad one stops the server with a clear message.
"""

from __future__ import annotations

import ipaddress
import socket
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, FilePath, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from .decision import DefaultAction
from .fleet import MAX_BATCH_RECORDS, POD_NAME
from .parameters import ConnectionUsername, IdentityConfig
from .rules.secrets import (
    DEFAULT_ENV_PREFIX,
    DEFAULT_SECRET_DIRS,
    SecretPolicy,
    is_reference,
    parse_secret_dirs,
)
from .rules.trace import TraceMode

_IDENTITY = IdentityConfig()
MAX_CHECKS_IN_PROGRESS = 1024


def split_host_port(value: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` → (host, port); raises ValueError."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{value!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def is_loopback(host: str) -> bool:
    """Whether ``host`` (of ``split_host_port``) is reachable from this machine only. A name other
    than ``localhost`` may resolve to anything: it counts as the network."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


Listener = Literal["grpc", "http", "authz-http"]
"""The sidecar's listeners by name, as ``--insecure-listen`` names them: ``grpc`` (``--listen``),
``http`` (``--http``), ``authz-http`` (``--authz-http``)."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SAFOUS_", extra="forbid", frozen=True)

    db: Path = Field(Path("rules.db"), description="the rules database (created if absent)")
    listen: str = Field("127.0.0.1:9191", description="gRPC address Envoy calls, HOST:PORT")
    default_action: DefaultAction = Field(
        "deny", description="decision when no policy matches (zero trust: deny)")
    http: str | None = Field(None, description="HOST:PORT serving /healthz, /readyz and /metrics (off when unset)")
    authz_http: str | None = Field(
        None, description="HOST:PORT of the HTTP authorization endpoint, beside gRPC: Envoy's http_service, nginx "
        "auth_request, Caddy forward_auth, Traefik forwardAuth (off when unset; needs --authz-http-profile)")
    authz_http_profile: Literal["envoy", "forward-auth"] | None = Field(
        None, description="who calls --authz-http, so where a request's facts come from: envoy (its http_service, "
        "with the shipped config's x-safous-authz-* headers) or forward-auth (nginx, Caddy, Traefik: "
        "X-Forwarded-Method, -Uri, -Host, -Proto, -For)")
    authz_http_trusted_hops: int = Field(
        1, ge=1, le=16, description="forward-auth: %remote_ip% is the address this many trusted proxies back in "
        "X-Forwarded-For, counted from the right (1: the one the proxy calling the sidecar appended)")
    authz_http_client_cert_header: str | None = Field(
        None, description="forward-auth: the header in which the proxy passes the client certificate (URL-encoded "
        "PEM, PEM or base64 DER), for %cert_*%; read only when named (a client could send any other)")
    authz_http_path_prefix: str = Field(
        "", description="envoy: the path_prefix of Envoy's http_service, removed from the path before policies "
        "match it")
    tls_cert: FilePath | None = Field(
        None, description="PEM certificate for TLS on the gRPC listener (plaintext when unset)")
    tls_key: FilePath | None = Field(None, description="PEM private key of --tls-cert")
    tls_client_ca: FilePath | None = Field(
        None, description="PEM CA: require gRPC clients (Envoy) to present a certificate it signed")
    workers: int = Field(
        1, ge=1, le=64, description="server processes sharing the port (SO_REUSEPORT), each with its own event loop")
    workers_refresh: float = Field(
        5.0, ge=0.5, le=300, description="--workers with --http: seconds between the supervisor's reads of the "
        "workers' metrics when no scrape reads them (a worker that dies loses what it counted since)")
    log_format: Literal["json", "text"] = Field("json", description="log lines on stderr")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="log threshold")
    event_loop: Literal["uvloop", "asyncio"] = Field(
        "uvloop", description="event loop implementation (uvloop measured ~20% more checks/s)")
    grace_period: float = Field(5.0, ge=0, description="seconds in-flight checks get on SIGTERM")
    reload_interval: float = Field(1.0, gt=0, description="seconds between checks of rules.db for changes")
    webhook_ca_bundle: FilePath | None = Field(
        None, description="PEM file of extra CAs trusted for https webhooks (private CAs); the system store is always "
        "trusted")
    cache_size: int = Field(
        10_000, ge=0, description="decisions kept by the per-rule decision cache (LRU; rules opt in with cache_ttl)")
    cache_max_bytes: int = Field(
        64 << 20, ge=0, description="bytes the decision cache may hold (reasons, stored values, keys); least recently "
        "used go first")
    cache_failure_ttl: float = Field(
        2.0, ge=0, description="seconds a failed webhook call (timeout, 5xx, unreachable…) stays cached, at most the "
        "rule's TTL")
    activity_retention_days: float | None = Field(
        None, gt=0, description="delete activity log rows older than this many days (off when unset)")
    activity_retention_rows: int | None = Field(
        None, ge=1, description="keep at most this many activity log rows, the newest (off when unset)")
    trace: TraceMode = Field(
        "denied", description="keep the evidence behind decisions (each rule's request, answer, outcome; "
        "safous-admin explain): for denials and audit denials, every decision, or none")
    max_checks_in_progress: int = Field(
        MAX_CHECKS_IN_PROGRESS, ge=1, description="checks decided at once (most waiting for webhooks); one beyond "
        "it is denied at once with code overloaded, as is one whose caller's deadline passed before it started")
    activity_queue: int = Field(10_000, ge=1, description="decisions buffered for the activity log before dropping")
    username_header: str = Field(_IDENTITY.username_header, description="header carrying %username%")
    device_id_header: str = Field(_IDENTITY.device_id_header, description="header carrying %device_id%")
    groups_header: str = Field(_IDENTITY.groups_header, description="header carrying %groups%")
    group_names_header: str = Field(_IDENTITY.group_names_header, description="header carrying %group_names%")
    connection_username: ConnectionUsername = Field(
        _IDENTITY.connection_username,
        description="%username% of a TCP connection (no headers): the client certificate's subject CN, or none")
    jwt_metadata_namespace: str = Field(
        "envoy.filters.http.jwt_authn", description="metadata namespace holding the verified JWT payload")
    jwt_payload_key: str = Field(
        "jwt_payload", description="key of the payload in that namespace (payload_in_metadata)")
    jwt_username_claim: str = Field(_IDENTITY.jwt_username_claim, description="JWT claim for %username% (dot path)")
    jwt_groups_claim: str = Field(_IDENTITY.jwt_groups_claim, description="JWT claim for %groups%")
    jwt_group_names_claim: str = Field(_IDENTITY.jwt_group_names_claim, description="JWT claim for %group_names%")
    # NoDecode: the variable is a PATH-like list, not the JSON pydantic-settings expects.
    secret_dir: Annotated[tuple[str, ...], NoDecode] = Field(
        DEFAULT_SECRET_DIRS, description="directory whose files file:PATH secret references may read (absolute "
        "path; symbolic links may not lead out of it); repeat the flag for more; the variable takes a "
        ":-separated list like PATH, empty for none (file: references refused)")
    secret_env_prefix: str = Field(
        DEFAULT_ENV_PREFIX, description="env:NAME secret references may only read variables whose names start "
        "with this (not empty)")
    bundle: str | None = Field(
        None, description="signed rule bundle to follow: a file (e.g. a mounted ConfigMap) or an http(s):// URL; "
        "the bundle then owns rules and policies (off when unset)")
    bundle_poll_interval: float = Field(
        5.0, gt=0, description="seconds between polls of --bundle (less a random 0-20 %; doubled per failure, up "
        "to 8 times)")
    bundle_verification_key: Annotated[tuple[str, ...], NoDecode] = Field(
        (), description="[KID=]PATH of a PEM public key (Ed25519 or P-256) bundles may be signed with, KID "
        "defaulting to the key's RFC 7638 thumbprint; repeat the flag for more (key rotation); the variable "
        "takes a :-separated list")
    bundle_insecure_skip_verify: bool = Field(
        False, description="apply bundles without checking their signature (logs a warning; tests only)")
    bundle_ca_bundle: FilePath | None = Field(
        None, description="PEM file of the CAs trusted for an https --bundle (the system store when unset)")
    bundle_bearer_token: str | None = Field(
        None, description="env:NAME or file:PATH of a bearer token sent to an http(s) --bundle (within "
        "--secret-dir / --secret-env-prefix)")
    bundle_max_bytes: int = Field(16 << 20, ge=1, description="largest bundle accepted, in bytes")
    insecure_listen: Annotated[tuple[Listener, ...], NoDecode] = Field(
        (), description="listeners allowed on a network address without TLS, by name: grpc (--listen), http "
        "(--http), authz-http (--authz-http); repeat the flag for more; the variable takes a comma-separated "
        "list. Without it such a listener refuses to start: whoever reaches the gRPC port can make the sidecar "
        "call the webhooks with its credentials")
    bundle_min_sequence: int = Field(
        0, ge=0, description="refuse bundles with a lower sequence even on an empty rules.db (set it from the "
        "publisher, e.g. the sequence of the last security fix: a fresh pod cannot be fed an older bundle)")
    pod_name: str | None = Field(
        None, description="this pod's name in the fleet's activity log (--decision-log-url, --decision-log-otlp): "
        "letters, digits, '.', '_' and '-', at most 253; the host name when unset (Kubernetes sets it to the "
        "pod's name)")
    decision_log_url: str | None = Field(
        None, description="the collector (safous-admin collect) every decision is shipped to, with its trace: "
        "https://HOST:PORT/v1/decisions (http:// only to loopback); needs --decision-log-bearer-token (off when "
        "unset)")
    decision_log_bearer_token: str | None = Field(
        None, description="env:NAME or file:PATH of the collector's token (within --secret-dir / "
        "--secret-env-prefix; read again for every batch)")
    decision_log_ca_bundle: FilePath | None = Field(
        None, description="PEM file of the CAs trusted for an https --decision-log-url (the system store when unset)")
    decision_log_interval: float = Field(
        1.0, gt=0, description="seconds between two batches to the collector (sooner once "
        "--decision-log-batch-records wait); doubled per failed try, up to 30 s")
    decision_log_batch_records: int = Field(
        1000, ge=1, le=MAX_BATCH_RECORDS, description="decisions in one batch to the collector at most (and at most "
        "2 MiB)")
    decision_log_buffer_bytes: int = Field(
        32 << 20, ge=64 << 10, description="bytes of decisions kept for the collector while it does not take them; "
        "past it the oldest go first, counted in safous_decision_log_dropped_total (this pod's activity log "
        "keeps them all)")
    decision_log_otlp: bool = Field(
        False, description="also send every decision as an OpenTelemetry log record over OTLP/HTTP, to "
        "OTEL_EXPORTER_OTLP_LOGS_ENDPOINT or OTEL_EXPORTER_OTLP_ENDPOINT")

    shared_cache: str | None = Field(
        None, description="redis://HOST:PORT[/DB], rediss://… or unix://PATH of a Redis or Valkey the fleet's "
        "sidecars share their cached rule decisions through, sealed with --shared-cache-key (off when unset: "
        "each pod caches alone)")
    shared_cache_key: str | None = Field(
        None, description="env:NAME or file:PATH of the fleet secret (at least 32 bytes, the same on every pod) "
        "that names and seals the shared cache's entries (within --secret-dir / --secret-env-prefix)")
    shared_cache_password: str | None = Field(
        None, description="env:NAME or file:PATH of the password (AUTH; an ACL user goes in the URL, "
        "redis://USER@HOST) for --shared-cache")
    shared_cache_ca_bundle: FilePath | None = Field(
        None, description="PEM file of the CAs trusted for a rediss:// --shared-cache (the system store when unset)")
    shared_cache_cluster: bool = Field(
        False, description="--shared-cache names a node of a Redis Cluster (or Valkey cluster)")
    shared_cache_timeout: float = Field(
        0.02, gt=0, le=1, description="seconds a check waits for one shared cache operation before going on "
        "without it")
    shared_cache_breaker_seconds: float = Field(
        5.0, gt=0, description="seconds the shared cache is not asked after 5 failures in a row (then one "
        "operation tries it)")

    @field_validator("listen", "http", "authz_http")
    @classmethod
    def _host_port(cls, value: str | None) -> str | None:
        if value is not None:
            split_host_port(value)
        return value

    @field_validator("secret_dir", mode="before")
    @classmethod
    def _secret_dirs(cls, value: Any) -> Any:
        return parse_secret_dirs(value) if isinstance(value, (str, list, tuple)) else value

    @field_validator("insecure_listen", mode="before")
    @classmethod
    def _listener_list(cls, value: Any) -> Any:
        return tuple(v.strip() for v in value.split(",") if v.strip()) if isinstance(value, str) else value

    @field_validator("bundle_verification_key", mode="before")
    @classmethod
    def _key_list(cls, value: Any) -> Any:
        return tuple(v for v in value.split(":") if v) if isinstance(value, str) else value

    @field_validator("bundle_bearer_token", "decision_log_bearer_token", "shared_cache_key", "shared_cache_password")
    @classmethod
    def _secret_reference(cls, value: str | None) -> str | None:
        if value is not None and not is_reference(value):
            raise ValueError("give it as env:NAME or file:PATH, not in clear (it would show in process lists and "
                             "manifests)")
        return value

    @field_validator("decision_log_url")
    @classmethod
    def _collector_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{value!r} is not an http(s):// URL")
        if parts.scheme == "http" and not is_loopback(parts.hostname):
            raise ValueError("http:// would send the token and the decisions in clear over the network: use "
                             "https:// (--decision-log-ca-bundle for a private CA), or a loopback address")
        if parts.username is not None:  # aiohttp refuses a user part beside the bearer token: every POST would fail
            raise ValueError("the URL holds a user part: the collector takes --decision-log-bearer-token alone")
        return value

    @field_validator("pod_name")
    @classmethod
    def _pod(cls, value: str | None) -> str | None:
        if value is not None and not POD_NAME.fullmatch(value):
            raise ValueError(f"{value!r} is not a pod name: letters, digits, '.', '_' and '-', at most 253, "
                             "starting with a letter or digit")
        return value

    @model_validator(mode="after")
    def _decision_log(self) -> Settings:
        if self.decision_log_url is not None:
            if self.decision_log_bearer_token is None:
                raise ValueError("--decision-log-url needs --decision-log-bearer-token env:NAME|file:PATH (the "
                                 "collector takes nothing without its token)")
            self.secret_policy.check(self.decision_log_bearer_token)
        if (self.decision_log_url is not None or self.decision_log_otlp) and self.pod_name is None \
                and not POD_NAME.fullmatch(socket.gethostname()):
            raise ValueError(f"the host name {socket.gethostname()!r} is not a pod name the fleet's activity log "
                             "takes: give --pod-name")
        return self

    @property
    def pod(self) -> str:
        """This pod's name in the fleet's activity log."""
        return self.pod_name or socket.gethostname()

    @field_validator("shared_cache")
    @classmethod
    def _shared_cache_url(cls, value: str | None) -> str | None:
        if value is None:
            return value
        url = urlsplit(value)
        if url.scheme not in ("redis", "rediss", "unix"):
            raise ValueError(f"{value!r} is not a redis://, rediss:// or unix:// URL")
        if url.password is not None or "password=" in url.query:
            raise ValueError("the URL holds a password: give it as --shared-cache-password env:NAME|file:PATH")
        return value

    @model_validator(mode="after")
    def _shared_cache(self) -> Settings:
        if self.shared_cache is None:
            return self
        if self.shared_cache_key is None:
            raise ValueError("--shared-cache needs --shared-cache-key env:NAME|file:PATH, the fleet secret that "
                             "seals its entries (Redis is untrusted storage)")
        for reference in (self.shared_cache_key, self.shared_cache_password):
            self.secret_policy.check(reference)
        scheme = urlsplit(self.shared_cache).scheme
        if self.shared_cache_ca_bundle is not None and scheme != "rediss":
            raise ValueError("--shared-cache-ca-bundle is for a rediss:// --shared-cache")
        if self.shared_cache_cluster and scheme == "unix":
            raise ValueError("--shared-cache-cluster needs a redis:// or rediss:// URL (a Cluster's nodes are "
                             "reached over TCP)")
        return self

    @model_validator(mode="after")
    def _bundle_keys(self) -> Settings:
        if self.bundle and not self.bundle_verification_key and not self.bundle_insecure_skip_verify:
            raise ValueError("--bundle needs --bundle-verification-key (the public key bundles are signed with), "
                             "or an explicit --bundle-insecure-skip-verify")
        if self.bundle_bearer_token is not None:
            self.secret_policy.check(self.bundle_bearer_token)
        return self

    @model_validator(mode="after")
    def _exposure(self) -> Settings:
        # Like Redis's protected mode: a plaintext listener the network reaches is an oracle
        # and a confused deputy (webhook calls with the sidecar's credentials, parameters of
        # the caller's choosing), so it exists only when the operator named it.
        for name, flag, address in self.exposed_listeners():
            if name not in self.insecure_listen:
                tls = " or serve it over TLS (--tls-cert, --tls-key, --tls-client-ca)" if name == "grpc" else ""
                raise ValueError(
                    f"{flag} {address} is reachable from the network without TLS; listen on loopback (127.0.0.1)"
                    f"{tls}, or accept it on purpose with --insecure-listen {name}")
        return self

    def exposed_listeners(self) -> list[tuple[Listener, str, str]]:
        """The listeners on a network address without TLS, as (name, flag, address)."""
        listeners: list[tuple[Listener, str, str]] = []
        if self.tls_cert is None and not is_loopback(split_host_port(self.listen)[0]):
            listeners.append(("grpc", "--listen", self.listen))
        if self.http is not None and not is_loopback(split_host_port(self.http)[0]):
            listeners.append(("http", "--http", self.http))
        if self.authz_http is not None and not is_loopback(split_host_port(self.authz_http)[0]):
            listeners.append(("authz-http", "--authz-http", self.authz_http))
        return listeners

    @model_validator(mode="after")
    def _authz_http_profile(self) -> Settings:
        if self.authz_http is None:
            return self
        if self.authz_http_profile is None:
            raise ValueError("--authz-http needs --authz-http-profile envoy|forward-auth: which proxy calls it decides "
                             "which of its headers are believed")
        if self.authz_http_client_cert_header and self.authz_http_profile != "forward-auth":
            raise ValueError("--authz-http-client-cert-header is for --authz-http-profile forward-auth (Envoy passes "
                             "the certificate in x-safous-authz-certificate)")
        if self.authz_http_path_prefix and (self.authz_http_profile != "envoy"
                                            or not self.authz_http_path_prefix.startswith("/")):
            raise ValueError("--authz-http-path-prefix is for --authz-http-profile envoy, and starts with /")
        return self


    @field_validator("secret_env_prefix")
    @classmethod
    def _secret_env_prefix(cls, value: str) -> str:
        SecretPolicy(env_prefix=value)  # raises ValueError for a prefix no variable name starts with
        return value

    @property
    def secret_policy(self) -> SecretPolicy:
        """Where the rules' secret references may point."""
        return SecretPolicy(self.secret_dir, self.secret_env_prefix)

    @property
    def identity(self) -> IdentityConfig:
        return IdentityConfig(
            username_header=self.username_header.lower(),
            device_id_header=self.device_id_header.lower(),
            groups_header=self.groups_header.lower(),
            group_names_header=self.group_names_header.lower(),
            jwt_username_claim=self.jwt_username_claim,
            jwt_groups_claim=self.jwt_groups_claim,
            jwt_group_names_claim=self.jwt_group_names_claim,
            connection_username=self.connection_username,
        )


def shown_default(value: object) -> str:
    """A setting's default as written on the command line or in its variable (a list as PATH
    writes one)."""
    if isinstance(value, tuple):
        return ":".join(map(str, value))
    return str(value)


def settings_reference() -> str:
    """The settings table of docs/platform/settings-and-lifecycle.md, generated from this model
    (a test keeps them equal)."""
    rows = ["| flag | environment | default | meaning |", "|---|---|---|---|"]
    for name, field in Settings.model_fields.items():
        rows.append(f"| `--{name.replace('_', '-')}` | `SAFOUS_{name.upper()}` | `{shown_default(field.default)}` "
                    f"| {field.description} |")
    return "\n".join(rows) + "\n"
