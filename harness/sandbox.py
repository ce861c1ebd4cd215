"""Run untrusted generated code outside the harness process.

Each program runs in a fresh `python -I` subprocess, in an empty temporary directory that is deleted
afterwards, with a wall-clock timeout (the whole process group is killed) and CPU-time, address-space and
file-size limits.
This guards the harness against accidents (infinite loops, memory blow-ups, stray files), not against
deliberately malicious code: run untrusted models' code in a container as well.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass


@dataclass
class SandboxResult:
    """Outcome of one sandboxed program."""

    passed: bool  # exited with status 0 within the limits
    status: str  # "passed" | "failed" | "timeout"
    detail: str  # last line of stderr (why it failed), empty when passed


def _limits(memory_bytes: int, cpu_seconds: int):
    def apply() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds))
        resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 20, 16 << 20))
        os.setsid()  # own process group: a timeout kills everything it spawned

    return apply


def run_program(source: str, timeout: float = 10.0, memory_mb: int = 1024) -> SandboxResult:
    """Execute `source` as a Python script under limits; pass = exit status 0."""
    with tempfile.TemporaryDirectory(prefix="ee_sandbox_") as tmp:
        path = os.path.join(tmp, "program.py")
        with open(path, "w", encoding="utf-8") as f:
            f.write(source)
        env = {"PATH": "/usr/bin:/bin", "PYTHONHASHSEED": "0", "HOME": tmp, "TMPDIR": tmp}
        proc = subprocess.Popen([sys.executable, "-I", "-B", path], cwd=tmp, env=env, text=True,
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                preexec_fn=_limits(memory_mb << 20, int(timeout) + 1))
        try:
            _, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return SandboxResult(False, "timeout", f"timed out after {timeout}s")
    if proc.returncode == 0:
        return SandboxResult(True, "passed", "")
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    return SandboxResult(False, "failed", lines[-1][:300] if lines else f"exit status {proc.returncode}")
