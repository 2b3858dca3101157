"""A busy machine for tests: processes that keep the CPUs spinning beside the node.

A production host is rarely idle; exactly-once and completion must not depend on the
node getting a CPU whenever it wants one. Each spinner stops by itself after
`seconds` (so a test that dies cannot leave the machine loaded), and leaving the
`with` block stops them all at once.
"""

from __future__ import annotations

import os
import subprocess
import sys
from types import TracebackType

__all__ = ["CpuStress"]

_SPIN = "import time\nend = time.monotonic() + {seconds}\nwhile time.monotonic() < end:\n    pass\n"


class CpuStress:
    """`processes` Python processes spinning for at most `seconds` each; by default two
    per CPU, a load of about twice the core count on an otherwise idle machine."""

    def __init__(self, *, processes: int | None = None, seconds: float = 1200.0) -> None:
        self.processes = processes if processes is not None else 2 * (os.cpu_count() or 1)
        self.seconds = seconds
        self._spinners: list[subprocess.Popen] = []

    def __enter__(self) -> "CpuStress":
        code = _SPIN.format(seconds=self.seconds)
        for _ in range(self.processes):
            self._spinners.append(subprocess.Popen([sys.executable, "-c", code]))
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.stop()

    def stop(self) -> None:
        """Let the CPUs go (before the end of the block, where a test's later steps need
        no busy machine)."""
        for spinner in self._spinners:
            spinner.kill()
        for spinner in self._spinners:
            spinner.wait()
        self._spinners.clear()
