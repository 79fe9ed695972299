"""Secret references: a rule's password or client secret kept out of ``rules.db``.

A secret field holds either the secret itself or a reference to it:

- ``env:NAME`` — the value of environment variable ``NAME``;
- ``file:PATH`` — the contents of file ``PATH`` (UTF-8, one trailing newline removed, as
  written by ``echo`` or a Kubernetes secret volume).

The prefixes are case-sensitive; any other value is the secret itself. References are
resolved when rules are loaded (blocking I/O: never on the check path) and shown as written;
clear values are only ever shown masked.

Whoever writes a rule chooses where its webhook calls go, so a reference must not be a way to
read the sidecar's own files or variables and send them there. A ``SecretPolicy`` says where
references may point: ``file:`` only at an absolute path under a secret directory
(``--secret-dir``), ``env:`` only at a variable whose name starts with the secret prefix
(``--secret-env-prefix``). The sidecar and the admin script read the same settings, so what
the admin script accepts is what the sidecar loads; the sidecar also resolves symbolic links
(the admin script, which may run elsewhere, checks the path as written).

Exceptions::

    ValueError
     └── SecretError   a reference that is malformed, not allowed, or cannot be resolved
                       (the message names the reference, never a secret value)
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = [
    "DEFAULT_ENV_PREFIX",
    "DEFAULT_SECRET_DIRS",
    "MASK",
    "SECRET_HEADERS",
    "SecretError",
    "SecretPolicy",
    "check_syntax",
    "is_reference",
    "mask",
    "parse_secret_dirs",
    "resolve_secret",
]

MASK = "••••••"
"""How a clear secret is shown. Fixed width, so it does not tell the secret's length."""
SECRET_HEADERS = ("authorization", "proxy-authorization")
"""Header names (lower case) whose values are credentials: masked wherever a rule is shown or
traced, never carried in clear by a bundle."""

DEFAULT_SECRET_DIRS: tuple[str, ...] = ("/var/run/secrets/safous",)
"""Where ``file:`` references may point unless configured: a directory of its own for the
sidecar's secrets (mount a Kubernetes secret volume there), beside the kubelet's
``/var/run/secrets/kubernetes.io`` (the pod's service-account token) but not including it."""

DEFAULT_ENV_PREFIX = "SAFOUS_SECRET_"
"""The prefix ``env:`` references must start with unless configured."""

_ENV = "env:"
_FILE = "file:"
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# A secret is a password or a client secret; anything bigger is a wrong path (/dev/zero...).
_MAX_FILE_BYTES = 64 * 1024


class SecretError(ValueError):
    """A secret reference that cannot be used. ``reference`` is the reference as written."""

    def __init__(self, reference: str, problem: str) -> None:
        self.reference = reference
        super().__init__(f"secret {reference}: {problem}")


def is_reference(value: str | None) -> bool:
    """Whether ``value`` is an ``env:NAME`` or ``file:PATH`` reference rather than a secret."""
    return value is not None and value.startswith((_ENV, _FILE))


def parse_secret_dirs(values: str | Iterable[str]) -> tuple[str, ...]:
    """Secret directories as a setting gives them: each value a ``:``-separated list (like
    ``PATH``), empty entries skipped, so ``""`` is no directory at all. Raises ``ValueError``
    for a directory that is not an absolute path."""
    if isinstance(values, str):
        values = [values]
    dirs = []
    for value in values:
        for entry in value.split(os.pathsep):
            if not entry:
                continue
            if not os.path.isabs(entry):
                raise ValueError(f"secret directory {entry!r} is not an absolute path")
            dirs.append(os.path.normpath(entry))
    return tuple(dict.fromkeys(dirs))


def check_syntax(value: str | None) -> None:
    """Raise ``SecretError`` if ``value`` is a reference with no name or path, or an ``env:``
    name that is not a variable name. Where it points is ``SecretPolicy.check``'s matter."""
    if value is None:
        return
    if value.startswith(_ENV):
        name = value[len(_ENV):]
        if not name:
            raise SecretError(value, "the environment variable name is missing")
        if not _ENV_NAME.fullmatch(name):
            raise SecretError(value, "env:NAME needs an environment variable name "
                                     "(letters, digits and _, not first a digit)")
    elif value.startswith(_FILE):
        if not value[len(_FILE):]:
            raise SecretError(value, "the file path is missing")
        if "\0" in value:
            raise SecretError(value, "the file path holds a NUL character")


@dataclass(frozen=True, slots=True)
class SecretPolicy:
    """Where secret references may point. ``dirs``: absolute, normalised directories whose
    files ``file:`` may read (none: ``file:`` is refused); ``env_prefix``: how the names of the
    variables ``env:`` may read begin. Build ``dirs`` with ``parse_secret_dirs``."""

    dirs: tuple[str, ...] = DEFAULT_SECRET_DIRS
    env_prefix: str = DEFAULT_ENV_PREFIX

    def __post_init__(self) -> None:
        if any(not os.path.isabs(d) or os.path.normpath(d) != d for d in self.dirs):
            raise ValueError(f"secret directories must be absolute and normalised: {self.dirs!r}")
        # Not empty: an empty prefix would open every variable (cloud credentials, settings).
        if not _ENV_NAME.fullmatch(self.env_prefix):
            raise ValueError(f"secret environment prefix {self.env_prefix!r} must be the start of a variable "
                             "name (letters, digits and _, not first a digit), and not empty")

    def check(self, value: str | None) -> None:
        """Raise ``SecretError`` if ``value`` is a reference that is malformed or points outside
        this policy; a clear secret or ``None`` passes. No I/O: the path is judged as written
        (``..`` resolved), so the admin script can check a rule for a sidecar elsewhere."""
        check_syntax(value)
        if value is None:
            return
        if value.startswith(_ENV):
            if not value[len(_ENV):].startswith(self.env_prefix):
                raise SecretError(value, f"only variables whose names start with {self.env_prefix} may be read "
                                         f"(--secret-env-prefix / SAFOUS_SECRET_ENV_PREFIX); give the "
                                         f"secret to the sidecar under such a name")
        elif value.startswith(_FILE):
            path = value[len(_FILE):]
            if not os.path.isabs(path):
                raise SecretError(value, "the path is relative: use an absolute path under a secret "
                                         f"directory ({self._dirs_shown()})")
            if not self.holds(os.path.normpath(path)):
                raise SecretError(value, self.outside("not under a secret directory"))

    def holds(self, path: str, *, real_dirs: bool = False) -> bool:
        """Whether the absolute, normalised ``path`` lies below one of the directories (their
        real paths with ``real_dirs``: reads the file system)."""
        dirs: Iterable[str] = [os.path.realpath(d) for d in self.dirs] if real_dirs else self.dirs
        return any(path != d and os.path.commonpath([path, d]) == d for d in dirs)

    def _dirs_shown(self) -> str:
        return " ".join(f"--secret-dir {d}" for d in self.dirs) or "no --secret-dir is set"

    def outside(self, problem: str) -> str:
        """``problem`` with where files may be and how to add a place."""
        if not self.dirs:
            return (f"{problem}: file: references are off, no secret directory is set; add the file's "
                    "directory with --secret-dir / SAFOUS_SECRET_DIR")
        return (f"{problem} ({self._dirs_shown()}); put the file there or add its directory with "
                "--secret-dir / SAFOUS_SECRET_DIR")


def resolve_secret(value: str | None, policy: SecretPolicy) -> str | None:
    """The secret that ``value`` stands for: the referenced value for ``env:NAME`` and
    ``file:PATH``, ``value`` itself otherwise (``None`` stays ``None``).

    Raises ``SecretError`` when ``policy.check`` refuses the reference, when the file's real
    path (symbolic links resolved) is outside the real paths of the policy's directories, when
    the variable is not set, or the file cannot be read, is not UTF-8 text or is larger than
    64 KiB.
    """
    policy.check(value)
    if value is None:
        return None
    if value.startswith(_ENV):
        name = value[len(_ENV):]
        try:
            return os.environ[name]
        except KeyError:
            raise SecretError(value, f"environment variable {name} is not set") from None
    if value.startswith(_FILE):
        # Real paths on both sides: `..` and symbolic links cannot lead out of a directory,
        # while links that stay inside it (a Kubernetes secret volume's ..data) keep working.
        # The real path is what is opened, so what was checked is what is read.
        real = os.path.realpath(value[len(_FILE):])
        if not policy.holds(real, real_dirs=True):
            raise SecretError(value, policy.outside("its real path (symbolic links resolved) is not "
                                                    "under a secret directory"))
        return _read_file(value, real)
    return value


def mask(value: str | None) -> str:
    """``value`` as it may be shown (admin script, audit log): a reference as written, a clear
    secret as ``MASK``, no secret as ``""``."""
    if value is None:
        return ""
    return value if is_reference(value) else MASK


def _read_file(reference: str, path: str) -> str:
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
