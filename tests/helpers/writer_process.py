"""Run a writer helper (sqlite_writer, pg_writer) as a real subprocess and collect its acknowledgements.

A thread reads the child's stdout line by line (so the pipe never fills and
blocks the writer) and stamps every ``ack REVISION`` with the monotonic time
it arrived; ``retry`` lines are counted. The child is stopped by its PID only.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


class WriterProcess:
    """``python -m MODULE URL COUNT`` in the repository root, with its acks gathered as they come."""

    def __init__(self, module: str, url: str, count: int) -> None:
        self._lock = threading.Lock()
        self._acks: list[tuple[float, int]] = []
        self._retries: list[str] = []
        self._other: list[str] = []
        self._stderr_text = ""
        self._stderr = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - lives as long as the child; close()
        self.process = subprocess.Popen(
            [sys.executable, "-m", module, url, str(count)],
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            bufsize=1,
        )
        self._reader = threading.Thread(target=self._read, name=f"{module}-stdout", daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.process.pid

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            now = time.monotonic()
            word, _, rest = line.strip().partition(" ")
            with self._lock:
                if word == "ack":
                    self._acks.append((now, int(rest)))
                elif word == "retry":
                    self._retries.append(rest)
                else:
                    self._other.append(line.strip())

    @property
    def acks(self) -> list[tuple[float, int]]:
        """(arrival time, revision) of every acknowledged commit so far, in order."""
        with self._lock:
            return list(self._acks)

    @property
    def acked(self) -> list[int]:
        return [revision for _, revision in self.acks]

    @property
    def retries(self) -> list[str]:
        with self._lock:
            return list(self._retries)

    def wait_acks(self, count: int, timeout: float, after: float = 0.0) -> bool:
        """Wait (bounded) until *count* acks arrived later than monotonic time *after*; False if the child died."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if sum(1 for at, _ in self.acks if at > after) >= count:
                return True
            if self.process.poll() is not None:
                self._reader.join(timeout=5)
                break
            time.sleep(0.01)
        return sum(1 for at, _ in self.acks if at > after) >= count

    def kill(self, sig: int = signal.SIGKILL) -> int:
        """Send *sig* to the child by PID, reap it (bounded) and drain its stdout; returns its exit status."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, sig)
        try:
            status = self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(self.pid, signal.SIGKILL)
            status = self.process.wait(timeout=10)
        self._reader.join(timeout=10)
        return status

    def stop(self) -> None:
        """Make sure the child is gone (SIGTERM, then SIGKILL), for finally blocks."""
        if self.process.poll() is None:
            self.kill(signal.SIGTERM)
        self._reader.join(timeout=10)
        if self.process.stdout is not None:
            self.process.stdout.close()

    def stderr(self) -> str:
        """What the child wrote to stderr so far (kept after close)."""
        if not self._stderr.closed:
            self._stderr.seek(0)
            self._stderr_text = self._stderr.read()
        return self._stderr_text

    def diagnostics(self) -> str:
        """The child's status, other stdout lines and stderr tail, for assertion messages."""
        with self._lock:
            other = self._other[-10:]
        return f"status={self.process.poll()} stdout={other} stderr={self.stderr()[-3000:]!r}"

    def close(self) -> None:
        """Stop the child and release the pipe and the stderr file."""
        self.stop()
        self.stderr()
        self._stderr.close()
