"""The release as a platform team gets it: the sdist and the wheel, and the wheel installed.

From the files the Dockerfile's build stage copies (taken from this checkout as a fresh clone
would have them: tracked and untracked files, nothing .gitignore'd, so no sidecar/_pb), this
module runs the Dockerfile's own build command (``python -m build``: the sdist, then the wheel
from the sdist, generating sidecar._pb with the pinned grpcio-tools), installs that wheel into a
new virtualenv with pip (dependencies from the package index; pip's cache makes reruns quick),
and then:

- checks what the sdist and the wheel hold (the whole package and its data, the generated code,
  no tests) and that the generated code's own version checks pass with what the wheel requires;
- runs the installed ``safous-admin`` to write and read rules.db and the installed
  ``safous-sidecar serve`` behind a real Envoy (envoy/envoy.yaml), as a client sees it;
- runs the installed server once more, alone and with ``--workers 2``, with the root filesystem
  read-only but for its rules.db directory and its working directory outside that, as the image
  runs it (a mount namespace; skipped where ``unshare`` cannot make one);
- holds the Dockerfile to the same build and install commands.

Bounded: each build or install step has a time limit, the module runs in about a minute once
pip's cache is warm.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tarfile
import time
import tomllib
import zipfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import grpc
import pytest
from packaging.requirements import Requirement
from packaging.version import Version

import sidecar
from sidecar._pb.envoy.service.auth.v3 import external_auth_pb2 as pb
from sidecar._pb.envoy.service.auth.v3 import external_auth_pb2_grpc as pb_grpc
from tests.envoy_harness import ENVOY_YAML, PROJECT_ROOT, render_config, run_envoy
from tests.helpers import FRESH, PERMISSION_DENIED, eventually, free_port, metric, ops_get
from tests.packaging_build import (
    STEP_TIMEOUT,
    Built,
    Installed,
    clean_env,
    copy_sources,
    release,
    run,
    stages,
)

pytestmark = [pytest.mark.packaging, pytest.mark.timeout(2 * STEP_TIMEOUT + 60)]

# The Dockerfile's build stage runs exactly this in its copy of the sources, and its final stage
# installs exactly the wheel it leaves in /dist (test_dockerfile_* below hold it to that).
DOCKER_BUILD = "python -m build --outdir /dist ."
DOCKER_INSTALL_WHEEL = "/dist/*.whl"
VERSION = sidecar.__version__
REASON_HEADER = "x-safous-denial-reason"


# --------------------------------------------------------------------------- the Dockerfile


def _pyproject() -> dict:
    return tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())


def _pin(requirements: list[str], name: str) -> str:
    (pinned,) = [r for r in requirements if Requirement(r).name == name]
    (spec,) = Requirement(pinned).specifier
    assert spec.operator == "==", pinned
    return spec.version


def test_dockerfile_builds_and_installs_what_this_module_tests():
    build, final = stages()[0], stages()[-1]
    assert f"RUN {DOCKER_BUILD}" in build
    installs = [i for i in final if i.startswith("RUN ") and "pip install" in i]
    assert len(installs) == 1 and installs[0].endswith(f"pip install --no-cache-dir {DOCKER_INSTALL_WHEEL}"), installs
    assert "from=build,source=/dist,target=/dist" in installs[0]
    # The build frontend at the version the dev extras (`make dist`) use.
    dev = _pyproject()["project"]["optional-dependencies"]["dev"]
    assert f"RUN pip install --no-cache-dir build=={_pin(dev, 'build')}" in build
    # `make dist` too.
    assert "\t$(PY) -m build --outdir dist .\n" in (PROJECT_ROOT / "Makefile").read_text()


def test_dockerignore_lets_in_what_the_build_stage_copies():
    lines = [line.strip() for line in (PROJECT_ROOT / ".dockerignore").read_text().splitlines()]
    rules = [line for line in lines if line and not line.startswith("#")]
    assert rules[0] == "*", "the context is an allow-list"
    for source in copy_sources():
        assert f"!{source}" in rules or f"!{source}/" in rules, f".dockerignore leaves out {source}"


def test_one_grpcio_tools_for_the_build_and_for_make_proto():
    project = _pyproject()
    assert _pin(project["build-system"]["requires"], "grpcio-tools") == \
        _pin(project["project"]["optional-dependencies"]["dev"], "grpcio-tools")
    assert project["project"]["dynamic"] == ["version"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "sidecar.__version__"}


# --------------------------------------------------------------------------- build and install


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    """The Dockerfile's build context from this checkout, and ``python -m build`` run in it
    (started with the session: tests/packaging_build.py)."""
    return release(tmp_path_factory).built.result()


@pytest.fixture(scope="module")
def installed(built: Built, tmp_path_factory: pytest.TempPathFactory) -> Installed:
    """The wheel installed with pip into a new virtualenv (no repository on its sys.path)."""
    return release(tmp_path_factory).installed.result()


# --------------------------------------------------------------------------- what ships


def test_sdist_builds_the_wheel_from_source_without_generated_code(built: Built):
    with tarfile.open(built.sdist) as sdist:
        names = {n.split("/", 1)[1] for n in sdist.getnames() if "/" in n}
    protos = {n for n in built.checkout if n.startswith("proto/")}
    assert protos and protos <= names
    assert {"setup.py", "pyproject.toml", "MANIFEST.in", "README.md", "CHANGELOG.md"} <= names
    assert not [n for n in names if n.startswith("sidecar/_pb")]


def test_wheel_holds_the_package_its_data_and_generated_code_and_nothing_else(built: Built):
    with zipfile.ZipFile(built.wheel) as wheel:
        names = set(wheel.namelist())
        metadata = wheel.read(f"safous_sidecar-{VERSION}.dist-info/METADATA").decode()
        entry_points = wheel.read(f"safous_sidecar-{VERSION}.dist-info/entry_points.txt").decode()
    assert built.wheel.name == f"safous_sidecar-{VERSION}-py3-none-any.whl"
    assert f"\nVersion: {VERSION}\n" in metadata

    # Every file of the package in a checkout (code, and data such as the migrations).
    package = {n for n in built.checkout if n.startswith("sidecar/")}
    assert {n for n in package if n.endswith(".sql")}, "the migrations are package files"
    assert package <= names, sorted(package - names)
    # The generated code, for every proto.
    generated = {n for n in names if n.startswith("sidecar/_pb/")}
    for proto in (n for n in built.checkout if n.startswith("proto/") and n.endswith(".proto")):
        stem = "sidecar/_pb/" + proto.removeprefix("proto/").removesuffix(".proto")
        assert {f"{stem}_pb2.py", f"{stem}_pb2.pyi", f"{stem}_pb2_grpc.py"} <= generated, proto
    assert all(n.endswith((".py", ".pyi")) for n in generated)
    # And nothing else: no tests, no protos, no configs.
    dist_info = {n for n in names if n.startswith(f"safous_sidecar-{VERSION}.dist-info/")}
    assert names - package - generated - dist_info == set()

    assert "safous-sidecar = sidecar.cli:main" in entry_points
    assert "safous-admin = sidecar.admin:main" in entry_points


def _lower_bound(requirement: Requirement) -> Version:
    bounds = [Version(s.version) for s in requirement.specifier if s.operator in (">=", "==", "~=")]
    assert bounds, f"{requirement} has no lower bound"
    return max(bounds)


def test_wheel_requires_the_runtimes_its_generated_code_demands(built: Built):
    """The generated modules refuse to import on an older grpcio or protobuf than the generator
    (and on another protobuf major): the wheel's requirements must rule those out."""
    with zipfile.ZipFile(built.wheel) as wheel:
        requires = {r.name: r for r in (Requirement(line.removeprefix("Requires-Dist: "))
                    for line in wheel.read(f"safous_sidecar-{VERSION}.dist-info/METADATA").decode().splitlines()
                    if line.startswith("Requires-Dist: ") and "extra ==" not in line)}
        sources = {n: wheel.read(n).decode() for n in wheel.namelist() if n.startswith("sidecar/_pb/")}
    grpc_versions = {m[1] for text in sources.values()
                     for m in re.finditer(r"GRPC_GENERATED_VERSION = '([\d.]+)'", text)}
    pb_versions = {tuple(int(x) for x in m.groups()) for text in sources.values() for m in re.finditer(
        r"ValidateProtobufRuntimeVersion\(\s*_runtime_version\.Domain\.PUBLIC,\s*(\d+),\s*(\d+),\s*(\d+),", text)}
    assert len(grpc_versions) == 1 and len(pb_versions) == 1, (grpc_versions, pb_versions)
    (grpc_generated,), ((major, minor, patch),) = grpc_versions, pb_versions

    assert _lower_bound(requires["grpcio"]) >= Version(grpc_generated)
    assert _lower_bound(requires["grpcio-health-checking"]) >= Version(grpc_generated)
    protobuf = requires["protobuf"]
    assert _lower_bound(protobuf) >= Version(f"{major}.{minor}.{patch}")
    assert not protobuf.specifier.contains(f"{major + 1}.0.0"), protobuf
    assert "grpcio-tools" not in requires, "the generator is a build requirement, not a runtime one"


# --------------------------------------------------------------------------- the installed programs


def test_installed_programs_are_the_wheel_and_say_its_version(installed: Installed):
    where = run([installed.bin("python"), "-c", "import sidecar; print(sidecar.__file__)"], cwd=installed.home)
    assert Path(where.stdout.strip()).is_relative_to(installed.venv), where.stdout
    assert run([installed.bin("safous-sidecar"), "--version"], cwd=installed.home).stdout == \
        f"safous-sidecar {VERSION}\n"
    assert run([installed.bin("safous-admin"), "--version"], cwd=installed.home).stdout == \
        f"safous-admin {VERSION}\n"


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    port: int
    started: dict
    log: Path


async def _wait_listening(process: subprocess.Popen[bytes], log: Path, timeout: float = 20.0) -> dict:
    """The server's "listening" log line (JSON), once it is written."""
    deadline = time.monotonic() + timeout
    while True:
        for line in log.read_text().splitlines():
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if record.get("message") == "listening":
                    return record
        if process.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"the installed server did not start (exit {process.poll()}):\n{log.read_text()}")
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def _serve(installed: Installed, argv: list[str], env: dict[str, str]) -> AsyncIterator[Server]:
    log = installed.home / f"sidecar-{time.monotonic_ns()}.log"
    with open(log, "wb") as err:
        process = subprocess.Popen(argv, cwd=installed.home, env=env, stdin=subprocess.DEVNULL,
                                   stdout=subprocess.DEVNULL, stderr=err)
    try:
        started = await _wait_listening(process, log)
        yield Server(process, int(started["port"]), started, log)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.to_thread(process.wait), 15)
        except TimeoutError:
            process.kill()
            process.wait()
            raise AssertionError(f"the installed server did not stop on SIGTERM:\n{log.read_text()}") from None


async def test_installed_wheel_answers_a_real_envoy(installed: Installed, upstream, tmp_path: Path):
    db = tmp_path / "rules.db"
    admin = [installed.bin("safous-admin"), "--db", str(db), "--actor", "packaging-test"]
    run([*admin, "policy", "add", "public", "--path-prefix", "/public/"], cwd=installed.home)
    listed = run([*admin, "policy", "list"], cwd=installed.home).stdout
    assert "public" in listed and "/public/" in listed, listed

    http_port = free_port()
    argv = [installed.bin("safous-sidecar"), "serve", "--listen", "127.0.0.1:0", "--http", f"127.0.0.1:{http_port}",
            "--reload-interval", "0.2"]
    async with _serve(installed, argv, clean_env(SAFOUS_DB=str(db))) as server:
        assert server.started["version"] == VERSION  # which release is running, in its first lines
        config = render_config(ENVOY_YAML, sidecar_port=server.port, upstream_port=upstream.port)
        async with run_envoy(config, tmp_path) as envoy, \
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as client:
            async with client.get(f"{envoy.url}/public/hello") as allowed:
                assert allowed.status == 200
                assert (await allowed.json())["path"] == "/public/hello"
            async with client.get(f"{envoy.url}/private") as denied:
                assert denied.status == 403
                assert denied.headers[REASON_HEADER] == "no policy matches this request"
                assert (await denied.json())["code"] == "no_matching_policy"
            async with client.get(f"http://127.0.0.1:{http_port}/metrics") as metrics:
                assert f'safous_build_info{{version="{VERSION}"}} 1.0' in (await metrics.text()).splitlines()
        assert [r["path"] for r in upstream.requests] == ["/public/hello"]
    assert server.process.returncode == 0, server.log.read_text()


def _read_only_root(volume: Path) -> list[str]:
    """A command prefix running the rest in a private mount namespace where the root filesystem
    is read-only and only ``volume`` (bound onto itself first) stays writable."""
    script = 'mount --bind "$1" "$1" && mount -o remount,bind,ro / && shift && exec "$@"'
    return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script, "sh", str(volume)]


@pytest.fixture
def read_only_root(tmp_path: Path) -> Iterator[tuple[Path, list[str]]]:
    volume = tmp_path / "volume"
    volume.mkdir()
    prefix = _read_only_root(volume)
    # Read-only as in the image: no temporary directory Python would use, the working
    # directory (/) included.
    no_temp = f"cd / && ! {sys.executable} -c 'import tempfile; tempfile.gettempdir()' 2>/dev/null"
    if shutil.which("unshare") is None or subprocess.run(
            [*prefix, "sh", "-c", f"! touch {tmp_path}/probe 2>/dev/null && touch {volume}/probe && {no_temp}"],
            capture_output=True, timeout=10, env=clean_env()).returncode != 0:
        pytest.skip("cannot make the root filesystem, temporary directories included, read-only here "
                    "(unshare --mount needs root or user namespaces)")
    (volume / "probe").unlink()
    yield volume, prefix


def _check(path: str) -> pb.CheckRequest:
    request = pb.CheckRequest()
    http = request.attributes.request.http
    http.method, http.host, http.path, http.id = "GET", "app.example.com", path, path
    http.headers.update({":method": "GET", ":authority": "app.example.com", ":path": path})
    return request


SQLITE_FILES = {"rules.db", "rules.db-wal", "rules.db-shm"}
# A new connection per check, so that the checks of the --workers run reach both workers.


@pytest.mark.parametrize("workers", [0, 2])
async def test_installed_server_writes_only_its_volume(installed: Installed, read_only_root, workers: int):
    """As the image runs it: a read-only root filesystem, rules.db created, migrated and written
    (the activity log) on the volume; with --workers, the workers' sockets there too (no
    temporary directory is writable), removed when the pod stops. The working directory is
    outside the volume, and read-only."""
    volume, prefix = read_only_root
    db = volume / "rules.db"
    env = clean_env(SAFOUS_DB=str(db), PYTHONDONTWRITEBYTECODE="1")  # the Dockerfile's ENV
    for name in ("TMPDIR", "TEMP", "TMP"):
        env.pop(name, None)
    argv = [*prefix, installed.bin("safous-sidecar"), "serve", "--listen", "127.0.0.1:0"]
    http = free_port()
    if workers:
        argv[-1] = f"127.0.0.1:{free_port()}"
        argv += ["--workers", str(workers), "--http", f"127.0.0.1:{http}"]
    checks = 6 if workers else 1
    async with _serve(installed, argv, env) as server:
        if workers:
            async def ready() -> str:
                status, body = await ops_get(http, "/readyz")
                return body if status == 200 else ""

            assert await eventually(ready, timeout=20) == f"ready ({workers} workers)\n"
            (sockets,) = [p for p in volume.iterdir() if p.name not in SQLITE_FILES]
            assert sockets.name.startswith("safous-workers-")
            assert sorted(p.name for p in sockets.iterdir()) == [f"{i}.sock" for i in range(workers)]
        for i in range(checks):
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}", options=FRESH) as channel:
                response = await pb_grpc.AuthorizationStub(channel).Check(_check(f"/ro-{i}"), timeout=10)
            assert response.status.code == PERMISSION_DENIED  # no policy: the default, deny
        if workers:
            async def counted() -> bool:
                page = (await ops_get(http, "/metrics"))[1]
                return metric(page, "safous_decisions_total", policy="(none)", result="deny",
                              code="no_matching_policy", default=0) == checks

            await eventually(counted, timeout=10, what="the pod's /metrics counting every check")
    assert server.process.returncode == 0, server.log.read_text()
    assert {p.name for p in volume.iterdir()} <= SQLITE_FILES
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        assert conn.execute("SELECT code FROM activity_log").fetchall() == [("no_matching_policy",)] * checks
