"""Tiny task functions for tests/test_fanout.py. They live in a module of their own (on the tests' pythonpath)
because a spawned worker imports a task's function by name: a function of a test module would make every worker
import that module and its test dependencies."""

from __future__ import annotations

import time
from pathlib import Path


def square(x: int) -> int:
    print(f"square of {x}", flush=True)
    return x * x


def fail(message: str, stamp: str | None = None) -> None:
    """Raise ``message``, after writing the time it started to ``stamp``."""
    if stamp is not None:
        Path(stamp).write_text(repr(time.time()))
    raise ValueError(message)


def sleep(seconds: float, marker: str) -> None:
    Path(marker).touch()
    time.sleep(seconds)


def meet(folder: str, name: str, peers: int) -> dict:
    """Hold a marker file in ``folder`` until ``peers`` markers (this one included) are there at once; return the
    most markers seen (how many tasks ran together; -1 when the peers never came, after 60 s) and when it started
    and ended."""
    started = time.time()
    print(f"{name} is waiting for {peers - 1} more", flush=True)
    folder_path = Path(folder)
    mine = folder_path / f"{name}.running"
    mine.touch()
    try:
        most = 0
        give_up = time.monotonic() + 60
        while (seen := len(list(folder_path.glob("*.running")))) < peers:
            most = max(most, seen)
            if time.monotonic() > give_up:
                return {"name": name, "together": -1, "started": started, "ended": time.time()}
            time.sleep(0.02)
        time.sleep(0.2)  # a worker started past the limit would show up here
        together = max(most, seen, len(list(folder_path.glob("*.running"))))
        return {"name": name, "together": together, "started": started, "ended": time.time()}
    finally:
        mine.unlink()
