"""Rules (Custom): a webhook call plus the criteria its answer must meet, as typed values.

The database layer (``sidecar.db``) turns rows into these models; the admin script validates
input with them before anything is written. Semantics: docs/admins/rules.md.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from ..policies import Policy
from .choices import ActionType as ActionType
from .choices import AuthType as AuthType
from .choices import Verification as Verification
from .safe_regex import compile_regex

DEFAULT_TIMEOUT_MS = 1000


# fullmatch, not match with "$": "$" also matches before a final newline ("tok\n").
_STORE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 token


class ResponseAction(BaseModel):
    """One API Response Action: ``key`` is a dot path into the webhook's JSON answer."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    type: ActionType
    key: str = Field(min_length=1)
    value: str

    @model_validator(mode="after")
    def _check_value(self) -> ResponseAction:
        if self.type is ActionType.REGEX:
            compile_regex(self.value)  # RegexError (a ValueError) says what RE2 refuses
        if self.type is ActionType.STORE and not _STORE_NAME.fullmatch(self.value):
            raise ValueError(
                f"store name {self.value!r} must be 1-64 letters, digits, '_' or '-'"
            )
        return self


class Rule(BaseModel):
    """A custom rule. Secrets (``password``, ``client_secret``) may be ``env:NAME`` or
    ``file:PATH`` references, resolved when rules are loaded."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1, max_length=128)
    enabled: bool = True
    method: Literal["GET", "POST"] = "GET"
    url: str
    headers: tuple[tuple[str, str], ...] = ()
    body: str | None = None
    auth: AuthType = AuthType.NONE
    username: str | None = None
    password: str | None = None
    token_url: str | None = None
    client_id: str | None = None
    client_secret: str | None = None
    verification: Verification = Verification.JSON
    actions: tuple[ResponseAction, ...] = ()
    timeout_ms: int = Field(default=DEFAULT_TIMEOUT_MS, ge=1, le=60_000)
    cache_ttl: float = Field(default=0, ge=0)

    @field_validator("method", mode="before")
    @classmethod
    def _upper_method(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator("url", "token_url")
    @classmethod
    def _http_url(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return None
        # Templates may sit in the URL; only the scheme and host part must be literal.
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"{value!r} is not an http:// or https:// URL")
        # The HTTP client would send a user part as Basic credentials, but as part of the URL
        # it is no secret field: stored, bundled, shown and logged in clear. The value is not
        # repeated in the message, since it holds the password.
        if "@" in parts.netloc:
            instead = ("--auth oauth with --client-id and --client-secret env:NAME (or file:PATH)"
                       if info.field_name == "token_url" else
                       "--auth basic with --username and --password env:NAME (or file:PATH)")
            raise ValueError(f"the URL holds a user name or password (before '@'), which would be stored and "
                             f"shown in clear: give the URL without it and use {instead}")
        return value

    @field_validator("headers")
    @classmethod
    def _header_names(cls, value: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
        for key, val in value:
            if not _HEADER_NAME.fullmatch(key):
                raise ValueError(f"header name {key!r} is not a valid HTTP header name")
            if any(c in val for c in "\r\n\0"):
                raise ValueError(f"header {key!r} value holds CR, LF or NUL")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Rule:
        if self.body is not None and self.method != "POST":
            raise ValueError("a body is only allowed with POST")
        if self.auth is AuthType.BASIC and (self.username is None or self.password is None):
            raise ValueError("basic authentication needs a username and a password")
        if self.auth is AuthType.OAUTH and not (self.token_url and self.client_id and self.client_secret):
            raise ValueError("oauth authentication needs a token URL, a client ID and a client secret")
        return self

    def header(self, name: str) -> str | None:
        """The value of the rule's own header ``name`` (case-insensitive), if set."""
        lower = name.lower()
        return next((v for k, v in self.headers if k.lower() == lower), None)


@dataclass(frozen=True, slots=True)
class InvalidRow:
    """A rules or policies row that does not validate (rules.db is read by the database layer,
    which makes these; the evaluate stage reports them): ``error`` says why in one line.

    For a policy, ``fallback`` is what it can still be matched as: a widened match that denies
    (``sidecar.db.rule_set``)."""

    kind: str
    name: str
    error: str
    fallback: Policy | None = None
