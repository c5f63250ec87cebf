"""An ``apollo-sync watch`` subprocess for the tests that drive one."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def watch_process(*args: str) -> Iterator[subprocess.Popen[str]]:
    """``python -m apollo_sync watch *args``, line-buffered text pipes; killed if
    the test leaves before it ends, its pipes drained either way."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "apollo_sync", "watch", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        bufsize=1,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
