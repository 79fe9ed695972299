"""The files of ``export`` and ``import``: the document (``sidecar.exchange``, which also checks
and plans an import) read from a file or standard input, and written to a file.
"""

from __future__ import annotations

import json
import os
from typing import IO, Any

from .validation import AdminError

__all__ = ["read_document", "write_export"]


def read_document(file: IO[str]) -> tuple[str, Any]:
    """The JSON document in ``file``, and the file's name as messages say it. Raises
    ``AdminError`` for a file that is not JSON text."""
    source = "standard input" if file.name == "<stdin>" else file.name
    try:
        return source, json.load(file)
    except json.JSONDecodeError as exc:
        raise AdminError(f"{source}: not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except UnicodeDecodeError:
        raise AdminError(f"{source}: not UTF-8 text") from None


def write_export(path: str, text: str, *, with_secrets: bool) -> None:
    """Write ``text`` to ``path``, created readable by its owner only if it holds secrets.
    Raises ``AdminError``."""
    mode = 0o600 if with_secrets else 0o666
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with open(fd, "w", encoding="utf-8") as out:
            out.write(text)
    except OSError as exc:
        raise AdminError(f"cannot write {path}: {exc.strerror}") from None
