"""The release built and installed as tests/test_packaging.py checks it, started early.

Building (``python -m build``: two isolated build environments) and installing the wheel into a
new virtualenv take ~30 s of pip, most of the packaging module's time. The suite leaves about
half of two cores idle (it waits on servers, proxies and timeouts), so when the session holds
packaging tests this work starts with the session, in a thread whose processes run at the lowest
priority (``nice 19``): it takes only CPU no test wants, and the module finds it done.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.envoy_harness import PROJECT_ROOT

# Building with an isolated build environment and installing the wheel's dependencies both go
# through pip: minutes on a cold cache and a slow index, seconds on a warm one.
STEP_TIMEOUT = 300
DOCKERFILE = PROJECT_ROOT / "Dockerfile"


@dataclass(frozen=True)
class Built:
    checkout: list[str]
    sdist: Path
    wheel: Path


@dataclass(frozen=True)
class Installed:
    venv: Path
    home: Path  # a directory outside the repository, the installed programs' working directory

    def bin(self, name: str) -> str:
        return str(self.venv / "bin" / name)


def stages() -> list[list[str]]:
    """The Dockerfile's stages, each a list of instructions (continuation lines joined)."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    result: list[list[str]] = []
    for line in lines:
        if line.startswith("FROM "):
            result.append([])
        if result:
            result[-1].append(line)
    return result


def copy_sources() -> list[str]:
    """What the build stage copies from the build context (COPY SRC... DEST)."""
    sources: list[str] = []
    for instruction in stages()[0]:
        if instruction.startswith("COPY "):
            *srcs, _dest = instruction.split()[1:]
            assert not any(s.startswith("--") for s in srcs), instruction
            sources += [s.rstrip("/") for s in srcs]
    return sources


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without anything that would put the repository or .venv on sys.path."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV", "PYTHONSAFEPATH")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    env.update(extra)
    return env


def run(argv: list[str], *, cwd: Path, timeout: float = STEP_TIMEOUT, env: dict[str, str] | None = None) \
        -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, cwd=cwd, env=env or clean_env(), capture_output=True, text=True,
                            timeout=timeout, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, \
        f"{argv} exited {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def checkout_files() -> list[str]:
    """The files a fresh clone of this checkout would hold, with the work in progress: tracked
    and untracked, less what .gitignore keeps out."""
    if shutil.which("git") is None or not (PROJECT_ROOT / ".git").exists():
        pytest.skip("needs a git checkout to know which files a fresh clone has")
    out = run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=PROJECT_ROOT).stdout
    return sorted(f for f in out.split("\0") if f and (PROJECT_ROOT / f).is_file())


def _niced(argv: list[str]) -> list[str]:
    return ["nice", "-n", "19", *argv] if shutil.which("nice") else argv


def build(base: Path) -> Built:
    """The Dockerfile's build context from this checkout, and ``python -m build`` run in it."""
    checkout = checkout_files()
    context, dist = base / "context", base / "dist"
    sources = copy_sources()
    for name in checkout:
        if any(name == s or name.startswith(s + "/") for s in sources):
            (context / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(PROJECT_ROOT / name, context / name)
    assert not (context / "sidecar" / "_pb").exists()
    run(_niced([sys.executable, "-m", "build", "--outdir", str(dist), str(context)]), cwd=context)  # DOCKER_BUILD
    (sdist,) = dist.glob("*.tar.gz")
    (wheel,) = dist.glob("*.whl")
    return Built(checkout, sdist, wheel)


def install(built: Built, base: Path) -> Installed:
    """The wheel installed with pip into a new virtualenv (no repository on its sys.path)."""
    venv, home = base / "venv", base / "home"
    home.mkdir(parents=True)
    run(_niced([sys.executable, "-m", "venv", str(venv)]), cwd=home)
    # --no-compile: the programs compile what they import when they first run (3 s less here).
    run(_niced([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--no-compile", str(built.wheel)]),
        cwd=home)
    return Installed(venv, home)


class Release:
    """``build`` then ``install`` in a thread of their own, started once per session."""

    def __init__(self, base: Path) -> None:
        self.built: Future[Built] = Future()
        self.installed: Future[Installed] = Future()
        threading.Thread(target=self._work, args=(base,), name="packaging-build", daemon=True).start()

    def _work(self, base: Path) -> None:
        # pytest.skip too (no git checkout), which each waiting fixture then raises.
        try:
            built = build(base / "built")
        except (Exception, pytest.skip.Exception) as exc:  # noqa: BLE001 - the waiting test reports it
            self.built.set_exception(exc)
            self.installed.set_exception(exc)
            return
        self.built.set_result(built)
        try:
            self.installed.set_result(install(built, base / "installed"))
        except (Exception, pytest.skip.Exception) as exc:  # noqa: BLE001 - the waiting test reports it
            self.installed.set_exception(exc)


_release: Release | None = None
_lock = threading.Lock()


def release(tmp_path_factory: pytest.TempPathFactory) -> Release:
    """The session's release, started now if nothing started it yet."""
    global _release
    with _lock:
        if _release is None:
            _release = Release(tmp_path_factory.mktemp("release"))
        return _release
