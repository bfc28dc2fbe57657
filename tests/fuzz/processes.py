"""The producer under attack: a real ``python -m lensfeed.producer`` process in its own
process group, with what the fuzzer reads from ``/proc`` and its log (memory, CPU,
threads, tracebacks) and a kill that always reaps it.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path

from tests._util import REPO, child_env, python_cmd


class ProducerProcess:
    """A real producer (its own process group), output to a log file; killed by :meth:`kill`."""

    def __init__(self, overrides: Sequence[str], workdir: Path) -> None:
        self.overrides = list(overrides)
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None
        self.logs: list[Path] = []
        self._scanned = 0

    def start(self) -> None:
        self.kill()
        log_path = self.workdir / f"producer-{len(self.logs)}.log"
        self.logs.append(log_path)
        self._scanned = 0
        with open(log_path, "wb") as out:
            self.proc = subprocess.Popen(
                python_cmd("lensfeed.producer", "--rank", "0", *self.overrides),
                cwd=REPO,
                env=child_env(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def exit_code(self, wait_s: float = 0.0) -> int | None:
        """The exit status, waiting up to ``wait_s`` for it (None if still running)."""
        if self.proc is None:
            return None
        try:
            return self.proc.wait(timeout=wait_s) if wait_s > 0 else self.proc.poll()
        except subprocess.TimeoutExpired:
            return None

    def memory(self) -> tuple[int, int]:
        """(VmRSS, VmHWM) in bytes; (0, 0) once the process is gone."""
        try:
            text = Path(f"/proc/{self.pid}/status").read_text()
        except (OSError, AssertionError):
            return 0, 0
        kb = dict(re.findall(r"^(VmRSS|VmHWM):\s+(\d+) kB", text, re.M))
        return int(kb.get("VmRSS", 0)) * 1024, int(kb.get("VmHWM", 0)) * 1024

    def thread_states(self) -> str:
        """``name:state`` of each thread (R running, S sleeping, ...), for a hang report."""
        out = []
        for task in sorted(Path(f"/proc/{self.pid}/task").glob("*")):
            try:
                stat = (task / "stat").read_text()
            except OSError:
                continue
            name, rest = stat[stat.index("(") + 1 : stat.rindex(")")], stat[stat.rindex(")") + 2 :]
            out.append(f"{name}:{rest[0]}")
        return " ".join(out)

    def cpu_s(self) -> float:
        """CPU seconds the process has used (user + system); 0 once it is gone."""
        try:
            fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, AssertionError, IndexError):
            return 0.0
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def log_bytes(self) -> int:
        """Bytes logged by every producer started so far."""
        return sum(p.stat().st_size for p in self.logs if p.exists())

    def new_traceback(self) -> bool:
        """Whether a traceback was logged since the last call: the first sign of a crash,
        seconds before the process has closed its socket and exited."""
        if not self.logs or not self.logs[-1].exists():
            return False
        with open(self.logs[-1], "rb") as f:
            f.seek(max(0, self._scanned - 64))
            chunk = f.read()
        self._scanned = max(0, self._scanned - 64) + len(chunk)
        return b"Traceback (most recent call last)" in chunk

    def log_tail(self, n: int = 20, max_bytes: int = 16384) -> list[str]:
        """The last ``n`` lines of the current producer's log (each cut to 400 characters)."""
        if not self.logs or not self.logs[-1].exists():
            return []
        with open(self.logs[-1], "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - max_bytes))
            lines = f.read().decode(errors="replace").splitlines()
        return [line[:400] for line in lines[-n:]]

    def crash_site(self) -> str:
        """The project's own frames of the last traceback logged (not the stdlib or site
        packages), innermost last: where a crash happened, past any deep recursion."""
        lines = self.log_tail(100000, max_bytes=1 << 20)
        starts = [i for i, line in enumerate(lines) if line.startswith("Traceback (most recent")]
        if not starts:
            return ""
        frames: list[str] = []
        for line in lines[starts[-1] :]:
            m = re.match(r'\s*File "([^"]+)", line (\d+), in (\S+)', line)
            if m and "/lib/python3" not in m.group(1) and "site-packages" not in m.group(1):
                path = Path(m.group(1))
                frame = f"{path.parent.name}/{path.name}:{m.group(2)} {m.group(3)}"
                if not frames or frames[-1] != frame:
                    frames.append(frame)
        return " > ".join(frames[-5:])

    def kill(self) -> None:
        """SIGKILL the producer's process group (it may have children) and reap it."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
