"""Secret references: a rule's password or client secret kept out of ``rules.db``.

A secret field holds either the secret itself or a reference to it:

- ``env:NAME`` — the value of environment variable ``NAME``;
- ``file:PATH`` — the contents of file ``PATH`` (UTF-8, one trailing newline removed, as
  written by ``echo`` or a Kubernetes secret volume), relative paths from the working directory.

The prefixes are case-sensitive; any other value is the secret itself. References are
resolved when rules are loaded (blocking I/O: never on the check path) and shown as written;
clear values are only ever shown masked.

Exceptions::

    ValueError
     └── SecretError   a reference that cannot be resolved (the message names the
                       reference, never a secret value)
"""

from __future__ import annotations

import os

__all__ = ["MASK", "SecretError", "is_reference", "mask", "resolve_secret"]

MASK = "••••••"
"""How a clear secret is shown. Fixed width, so it does not tell the secret's length."""

_ENV = "env:"
_FILE = "file:"
# A secret is a password or a client secret; anything bigger is a wrong path (/dev/zero...).
_MAX_FILE_BYTES = 64 * 1024


class SecretError(ValueError):
    """A secret reference that cannot be resolved. ``reference`` is the reference as written."""

    def __init__(self, reference: str, problem: str) -> None:
        self.reference = reference
        super().__init__(f"secret {reference}: {problem}")


def is_reference(value: str | None) -> bool:
    """Whether ``value`` is an ``env:NAME`` or ``file:PATH`` reference rather than a secret."""
    return value is not None and value.startswith((_ENV, _FILE))


def resolve_secret(value: str | None) -> str | None:
    """The secret that ``value`` stands for: the referenced value for ``env:NAME`` and
    ``file:PATH``, ``value`` itself otherwise (``None`` stays ``None``).

    Raises ``SecretError`` when the variable is not set, the file cannot be read, is not UTF-8
    text or is larger than 64 KiB.
    """
    if value is None:
        return None
    if value.startswith(_ENV):
        name = value[len(_ENV):]
        if not name:
            raise SecretError(value, "the environment variable name is missing")
        try:
            return os.environ[name]
        except KeyError:
            raise SecretError(value, f"environment variable {name} is not set") from None
    if value.startswith(_FILE):
        return _read_file(value, value[len(_FILE):])
    return value


def mask(value: str | None) -> str:
    """``value`` as it may be shown (admin script, audit log): a reference as written, a clear
    secret as ``MASK``, no secret as ``""``."""
    if value is None:
        return ""
    return value if is_reference(value) else MASK


def _read_file(reference: str, path: str) -> str:
    if not path:
        raise SecretError(reference, "the file path is missing")
    try:
        with open(path, "rb") as file:
            data = file.read(_MAX_FILE_BYTES + 1)
    except OSError as exc:
        # strerror only: the exception's str() may repeat the path, never the contents,
        # but keep the message to one known shape.
        raise SecretError(reference, f"cannot read the file ({exc.strerror or type(exc).__name__})") from None
    if len(data) > _MAX_FILE_BYTES:
        raise SecretError(reference, f"the file is larger than {_MAX_FILE_BYTES // 1024} KiB")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        # Not chained: the decode error quotes the offending bytes of the secret.
        raise SecretError(reference, "the file is not UTF-8 text") from None
    if text.endswith("\r\n"):
        return text[:-2]
    if text.endswith("\n"):
        return text[:-1]
    return text
