"""The fixed choices of a rule's settings: its authentication, the content type of its
webhook's answer, the types of its response actions.

Plain enums, apart from the model (``sidecar.rules.model``, which re-exports them) so that the
admin script declares its options from them without loading pydantic: its shell completion
builds the command line on every Tab.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = ["ActionType", "AuthType", "Verification"]


class AuthType(StrEnum):
    NONE = "none"
    BASIC = "basic"
    OAUTH = "oauth"


class Verification(StrEnum):
    JSON = "json"
    JSONP = "jsonp"


class ActionType(StrEnum):
    STRING = "string"
    REGEX = "regex"
    STORE = "store"
