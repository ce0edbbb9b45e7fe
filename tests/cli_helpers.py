"""Running the real CLIs in subprocesses, and freezing them at named points (jaxind.testhooks)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULES = {"main": "jaxind.main", "convert": "converters.convert"}


def cli_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": REPO, "HF_HUB_OFFLINE": "1", **extra}


def run_cli(cli: str, argv: list[str], cwd: str = REPO, env: dict[str, str] | None = None,
            **kwargs) -> subprocess.CompletedProcess:
    """``python -m <jaxind.main | converters.convert> argv``, output captured as text."""
    return subprocess.run([sys.executable, "-m", MODULES[cli], *argv], capture_output=True, text=True,
                          cwd=cwd, env=env or cli_env(), **kwargs)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


class Frozen:
    """A CLI process started with ``JAXIND_TEST_STOP_AT=point`` and waited for until it stops there.

    Its stdout/stderr go to files under ``log_dir`` (a stopped process must not block on a pipe).
    """

    def __init__(self, cli: str, argv: list[str], point: str, log_dir: str, **env: str):
        os.makedirs(log_dir, exist_ok=True)
        self._out = open(os.path.join(log_dir, f"{point}.out"), "w+")
        self._err = open(os.path.join(log_dir, f"{point}.err"), "w+")
        self.proc = subprocess.Popen([sys.executable, "-m", MODULES[cli], *argv], stdout=self._out, stderr=self._err,
                                     cwd=REPO, env=cli_env(JAXIND_TEST_STOP_AT=point, **env))
        _, status = os.waitpid(self.proc.pid, os.WUNTRACED)
        if not os.WIFSTOPPED(status):
            self.proc.returncode = os.waitstatus_to_exitcode(status)
            raise AssertionError(f"{argv} did not reach {point}: exit {self.proc.returncode}\n{self.stderr()[-3000:]}")

    def stderr(self) -> str:
        self._err.seek(0)
        return self._err.read()

    def stdout(self) -> str:
        self._out.seek(0)
        return self._out.read()

    def resume(self, sig: int | None = None, timeout: float = 300) -> int:
        """Delivers ``sig`` (if any), continues the process and waits for its exit status."""
        if sig is not None:
            os.kill(self.proc.pid, sig)
        os.kill(self.proc.pid, signal.SIGCONT)
        return self.proc.wait(timeout)

    def kill(self) -> int:
        """SIGKILL, as a crash or ``kill -9`` would; returns once the process is gone."""
        self.proc.kill()
        return self.proc.wait(60)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.kill()
        self._out.close()
        self._err.close()
