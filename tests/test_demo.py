"""`make run`: the demo stack comes up, its printed curl lines show allow and deny, Ctrl-C stops it.

The stack runs on free ports (``python -m sidecar.demo --envoy-port ...``), so that the test
runs even while `make run` holds the default ones.
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.helpers import ROOT, free_port


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(count: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < count:
        if (port := free_port()) not in ports:
            ports.append(port)
    return ports


@pytest.mark.timeout(90)
def test_demo_prints_curl_lines_that_allow_and_deny(tmp_path: Path) -> None:
    ports = free_ports(5)
    options = ("--envoy-port", "--envoy-admin-port", "--sidecar-port", "--upstream-port", "--webhook-port")
    args = [arg for option, port in zip(options, ports, strict=True) for arg in (option, str(port))]
    proc = subprocess.Popen([sys.executable, "-m", "sidecar.demo", *args], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            env={**os.environ, "SAFOUS_DB": str(tmp_path / "rules.db")})
    assert proc.stdout is not None
    watchdog = threading.Timer(60, proc.kill)  # a stack that never comes up ends the read below
    watchdog.start()
    try:
        lines: list[str] = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("Ctrl-C"):
                break
        else:
            raise AssertionError("the demo exited (or hung) before the stack was up:\n" + "".join(lines))
        watchdog.cancel()
        curls = [line.strip() for line in lines if line.strip().startswith("curl ")]
        assert len(curls) == 4 and all(f"127.0.0.1:{ports[0]}/" in c for c in curls), curls
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
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
    assert all(_port_free(p) for p in ports)


def test_the_demo_keeps_its_documented_ports_by_default() -> None:
    from sidecar.demo import ENVOY_CONFIG, Ports, demo_rules, envoy_config

    assert Ports() == Ports(envoy=8080, envoy_admin=9901, sidecar=9191, upstream=8081, webhook=8082)
    assert envoy_config(Ports()) == ENVOY_CONFIG.read_text()  # `make run` uses the file as shipped
    assert demo_rules()[0].url.startswith("http://127.0.0.1:8082/")
