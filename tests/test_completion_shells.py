"""Completion in a real shell: bash and zsh in tmux, each with ``safous-admin completion SHELL``
sourced from a clean rc file as the admin guide installs it (docs/admins/completion.md). The test
types as an admin does, presses Tab, and reads the screen (``capture-pane``) until it shows the
completion, within a bound.

tmux and zsh come from Debian (``make shells``, part of ``make test``); where they are missing,
this test is skipped, except under CI, where it fails.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sidecar.policies import Policy
from tests.admin_cli import rule
from tests.conftest import seed
from tests.helpers import needed_program

PROMPT = "tab> "

# The rc file of each shell, and how the shell is started on it without the system's own.
RC = {
    "bash": (".bashrc", f"PS1='{PROMPT}'\neval \"$(safous-admin completion bash)\"\n",
             ["bash", "--noprofile", "--rcfile", "{home}/.bashrc", "-i"]),
    "zsh": (".zshrc",
            f"PS1='{PROMPT}'\nautoload -Uz compinit && compinit -u\neval \"$(safous-admin completion zsh)\"\n",
            ["zsh", "--no-globalrcs", "-i"]),
}


class Terminal:
    """One shell in a tmux session of its own (its own server socket), 120 columns wide."""

    def __init__(self, socket: Path, env: dict[str, str], command: list[str]) -> None:
        self._tmux = [needed_program("tmux", "tmux"), "-S", str(socket)]
        self._env = env
        self._run("-f", "/dev/null", "new-session", "-d", "-x", "120", "-y", "30", "-s", "t", *command)

    def _run(self, *args: str) -> str:
        return subprocess.run([*self._tmux, *args], env=self._env, capture_output=True, text=True, check=True,
                              timeout=10).stdout

    def type(self, text: str, *keys: str) -> None:
        """Type ``text`` as it is, then press ``keys`` (tmux key names: Tab, C-c)."""
        if text:
            self._run("send-keys", "-t", "t", "-l", text)
        if keys:
            self._run("send-keys", "-t", "t", *keys)

    def line(self) -> str:
        """The screen's last line that holds anything: the prompt and what is typed."""
        lines = [line for line in self._run("capture-pane", "-p", "-t", "t").splitlines() if line.strip()]
        return lines[-1].rstrip() if lines else ""

    def shows(self, expected: str, within: float = 15) -> None:
        """Wait until the prompt line reads ``expected``; fail with the screen after ``within``
        seconds (a Tab is one process of the admin script; the machine may be busy)."""
        deadline = time.monotonic() + within
        while (line := self.line()) != expected:
            if time.monotonic() > deadline:
                screen = self._run("capture-pane", "-p", "-t", "t")
                pytest.fail(f"the screen never showed {expected!r}; its last line: {line!r}\n{screen}")
            time.sleep(0.02)  # between two looks at the screen, not a wait for the shell

    def close(self) -> None:
        subprocess.run([*self._tmux, "kill-server"], env=self._env, capture_output=True, timeout=10)


@pytest.fixture
def terminal(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Terminal]:
    shell: str = request.param
    needed_program(shell, shell)
    db = tmp_path / "rules.db"
    seed(db, [rule("posture"), rule("identity", stores=("tier",))],
         [Policy(name="web", hosts=("web.example.com",), rules=("identity", "posture"))])
    home = tmp_path / "home"
    home.mkdir()
    name, text, command = RC[shell]
    (home / name).write_text(text)
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": str(home), "ZDOTDIR": str(home),
           "SAFOUS_DB": str(db), "LANG": "C.UTF-8", "TERM": "xterm-256color"}
    term = Terminal(tmp_path / "tmux.sock", env, [part.format(home=home) for part in command])
    try:
        term.shows(PROMPT.rstrip())
        yield term
    finally:
        term.close()


@pytest.mark.parametrize("terminal", ["bash", "zsh"], indirect=True)
def test_tab_completes_a_parameter_and_a_rule_name(terminal: Terminal) -> None:
    typed = "safous-admin rule add r --header 'X-U=%us"
    terminal.type(typed, "Tab")
    # %user_agent% and %username%: the shell inserts what they share.
    terminal.shows(f"{PROMPT}safous-admin rule add r --header 'X-U=%user")
    terminal.type("n", "Tab")
    terminal.shows(f"{PROMPT}safous-admin rule add r --header 'X-U=%username%'")

    terminal.type("", "C-c")
    terminal.shows(PROMPT.rstrip())
    terminal.type("safous-admin policy add app --rule pos", "Tab")
    terminal.shows(f"{PROMPT}safous-admin policy add app --rule posture")
