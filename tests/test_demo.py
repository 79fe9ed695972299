"""`make run`: the demo stack comes up, its printed curl lines show allow and deny, Ctrl-C stops it."""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PORTS = (8080, 8081, 8082, 9191, 9901)


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.mark.timeout(90)
def test_demo_prints_curl_lines_that_allow_and_deny(tmp_path: Path) -> None:
    busy = [p for p in PORTS if not _port_free(p)]
    if busy:
        pytest.skip(f"the demo's fixed ports are in use: {busy} (is `make run` running?)")
    proc = subprocess.Popen([sys.executable, "-m", "sidecar.demo"], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            env={**os.environ, "SAFOUS_DB": str(tmp_path / "rules.db")})
    try:
        lines: list[str] = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line, "the demo exited before the stack was up"
            lines.append(line)
            if line.startswith("Ctrl-C"):
                break
        curls = [line.strip() for line in lines if line.strip().startswith("curl ")]
        statuses = []
        for command in curls:
            out = subprocess.run(shlex.split(command.replace("curl -i", "curl -s -i", 1)),
                                 capture_output=True, text=True, timeout=10).stdout
            statuses.append(int(out.split()[1]))
            if statuses[-1] == 403:
                assert "x-safous-denial-reason: " in out
        assert statuses == [200, 200, 403, 403]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) == 0
        assert "stopped" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
    assert all(_port_free(p) for p in PORTS)
