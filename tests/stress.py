"""A busy machine for tests: processes that keep the CPUs spinning beside the node.

A production host is rarely idle; exactly-once and completion must not depend on the
node getting a CPU whenever it wants one. Each spinner stops by itself after
`seconds` (so a test that dies cannot leave the machine loaded), and leaving the
`with` block stops them all at once.

On a machine with several CPUs the busy machine is one CPU: the spinners, and whatever
the test starts inside the block (the node, storescu), share it, so tests running beside
this one on the other CPUs keep theirs.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from types import TracebackType

__all__ = ["CpuStress"]

_SPIN = "import time\nend = time.monotonic() + {seconds}\nwhile time.monotonic() < end:\n    pass\n"


class CpuStress:
    """`processes` Python processes spinning for at most `seconds` each; by default two
    per CPU they run on, a load of about twice its core count on the CPU they share with
    what the test starts."""

    def __init__(self, *, processes: int | None = None, seconds: float = 1200.0) -> None:
        allowed = os.sched_getaffinity(0)
        self._restore = allowed
        self.cpus = {min(allowed)}
        self.processes = processes if processes is not None else 2 * len(self.cpus)
        self.seconds = seconds
        self._spinners: list[subprocess.Popen] = []

    def __enter__(self) -> "CpuStress":
        # This thread's processes and threads started from now on inherit the one CPU.
        os.sched_setaffinity(0, self.cpus)
        code = _SPIN.format(seconds=self.seconds)
        for _ in range(self.processes):
            self._spinners.append(subprocess.Popen([sys.executable, "-c", code]))
        return self

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """The spinners stopped for a step whose speed is not what the test is about (the
        node loading its model libraries), resumed after it whatever happened."""
        for spinner in self._spinners:
            spinner.send_signal(signal.SIGSTOP)
        try:
            yield
        finally:
            for spinner in self._spinners:
                spinner.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        """Let the CPU go, and what the test starts from now on have every CPU (before the
        end of the block, where a test's later steps need no busy machine)."""
        for spinner in self._spinners:
            spinner.kill()
        for spinner in self._spinners:
            spinner.wait()
        self._spinners.clear()
        os.sched_setaffinity(0, self._restore)

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.stop()
