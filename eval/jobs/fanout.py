"""Run picklable tasks in worker processes, at most N at once, under an optional wall-clock deadline.

    from vtprune.eval.jobs import fanout

    tasks = [fanout.Task(f"llava/{m}", evaluate, {"method": m}, log=out / "llava.log") for m in methods]
    for outcome in fanout.run(tasks, jobs=4, deadline=540):
        print(outcome.name, outcome.status, outcome.value if outcome.ok else outcome.error)

Every job of ``vtprune.eval.jobs`` that spreads work over processes goes through ``run``. A task is a module-level
function and its keyword arguments (both picklable); ``run`` returns one ``Outcome`` per task, in the order given:
``"ok"`` with the function's return value, ``"failed"`` with the traceback (an exception, a task that does not
pickle, or a worker that died without a result: out of memory, a CUDA abort), ``"killed at the deadline"`` (still
running when the deadline came) or ``"not started: deadline"``. One task's failure never loses the others' results.

Design: one ``multiprocessing`` *spawn* process per task, not a ``concurrent.futures.ProcessPoolExecutor``.
- spawn, because CUDA cannot be used in a forked child; every worker is a fresh interpreter.
- One process per task, because a deadline must stop a task that is running: a process can be killed, while an
  executor cancels only queued work and its worker processes are private (``_processes``); and because a worker
  that dies (out of memory, a CUDA abort) breaks a whole pool (``BrokenProcessPool``) and with it every other task,
  while here it fails only its own task. A fresh process per task also frees its CUDA context and cached memory
  for the next (``max_tasks_per_child=1`` would do that too, but needs Python 3.11 and still no deadline).
- The worker writes its result (pickled, to a temporary file, renamed into place when complete) and exits; the
  parent waits on the process sentinels (``multiprocessing.connection.wait``), so a large result never blocks in a
  pipe and a killed worker never leaves half a result.
- With ``log``, the worker's stdout and stderr (file descriptors 1 and 2, so output of C extensions too) are
  appended to that file; several tasks may share one log.
"""

from __future__ import annotations

import math
import os
import pickle
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing import connection, get_context
from pathlib import Path
from typing import Any

OK = "ok"
FAILED = "failed"
KILLED = "killed at the deadline"
NOT_STARTED = "not started: deadline"


@dataclass(frozen=True)
class Task:
    """One unit of work.

    Attributes:
        name: what the outcome and the messages call it.
        fn: a module-level function (the worker imports it by name, so no lambda or closure).
        kwargs: its keyword arguments, picklable.
        log: file that the worker's stdout and stderr are appended to; None keeps the parent's.
    """

    name: str
    fn: Callable[..., Any]
    kwargs: dict[str, Any] = field(default_factory=dict)
    log: Path | None = None


@dataclass
class Outcome:
    """What became of one task.

    Attributes:
        name: the task's name.
        status: ``OK``, ``FAILED``, ``KILLED`` ("killed at the deadline") or ``NOT_STARTED`` ("not started:
            deadline").
        value: the function's return value when ``status == OK``, else None.
        error: the traceback (or why there is no result) when ``status == FAILED``, else None.
        exitcode: the worker's exit status (0 after a result, 1 after an exception, negative when killed by a
            signal); None for a task that never started or could not be started (a task that does not pickle).
        seconds: wall time from the worker's start to its end (0 for a task that never started).
        pid: the worker's process id; None where there was no worker.
    """

    name: str
    status: str
    value: Any = None
    error: str | None = None
    exitcode: int | None = None
    seconds: float = 0.0
    pid: int | None = None

    @property
    def ok(self) -> bool:
        return self.status == OK


def run(tasks: Sequence[Task], jobs: int, deadline: float = math.inf) -> list[Outcome]:
    """Run ``tasks`` in spawned worker processes, at most ``jobs`` at once, in the order given; after ``deadline``
    seconds from this call, kill the workers still running and start no more. Returns one ``Outcome`` per task, in
    the order of ``tasks``."""
    if jobs < 1:
        raise ValueError(f"jobs must be at least 1, got {jobs}.")
    names = [task.name for task in tasks]
    if len(set(names)) != len(names):
        repeated = sorted({name for name in names if names.count(name) > 1})
        raise ValueError(f"Task names must be distinct; these repeat: {repeated}.")
    context = get_context("spawn")  # CUDA cannot be forked
    ends_at = time.monotonic() + deadline
    outcomes: list[Outcome | None] = [None] * len(tasks)
    queue = list(range(len(tasks)))
    running: dict[Any, tuple[int, Any, float, Path]] = {}  # sentinel -> (task index, process, start, result path)
    with tempfile.TemporaryDirectory(prefix="vtprune-fanout-") as work:
        try:
            while queue or running:
                while queue and len(running) < jobs and time.monotonic() < ends_at:
                    index = queue.pop(0)
                    task = tasks[index]
                    result = Path(work) / f"{index}.pickle"
                    process = context.Process(target=_worker, args=(task.fn, task.kwargs, str(result), task.log),
                                              name=f"vtprune-fanout-{task.name}")
                    try:
                        process.start()  # pickles the task: a lambda or an open file fails here, in the parent
                    except Exception:
                        outcomes[index] = Outcome(task.name, FAILED, error=traceback.format_exc())
                        continue
                    running[process.sentinel] = (index, process, time.monotonic(), result)
                if not running:
                    break  # the deadline came before the rest could start
                left = ends_at - time.monotonic()
                ready = connection.wait(list(running), timeout=None if math.isinf(left) else max(0.0, left))
                for sentinel in ready:
                    index, process, started, result = running.pop(sentinel)
                    process.join()
                    outcomes[index] = _collect(tasks[index], process, started, result)
                if not ready and time.monotonic() >= ends_at:
                    for index, process, started, result in running.values():
                        _stop(process)
                        if result.exists():  # it finished in the instant between the wait and the kill
                            outcomes[index] = _collect(tasks[index], process, started, result)
                        else:
                            outcomes[index] = Outcome(tasks[index].name, KILLED, exitcode=process.exitcode,
                                                      seconds=round(time.monotonic() - started, 1), pid=process.pid)
                    running.clear()
        finally:
            # Only reached with workers alive when the parent itself is interrupted (Ctrl-C, an error here): leave
            # no orphan holding a GPU.
            for _, process, _, _ in running.values():
                _stop(process)
    for index in queue:
        outcomes[index] = Outcome(tasks[index].name, NOT_STARTED)
    return [outcome for outcome in outcomes if outcome is not None]


def _collect(task: Task, process: Any, started: float, result: Path) -> Outcome:
    seconds = round(time.monotonic() - started, 1)
    if result.exists():
        status, payload = pickle.loads(result.read_bytes())
        if status == OK:
            return Outcome(task.name, OK, value=payload, exitcode=process.exitcode, seconds=seconds, pid=process.pid)
        return Outcome(task.name, FAILED, error=payload, exitcode=process.exitcode, seconds=seconds, pid=process.pid)
    error = (f"The worker of '{task.name}' exited with code {process.exitcode} without a result (killed by a signal "
             "when negative, e.g. -9 for out of memory); its log, if any, says more.")
    return Outcome(task.name, FAILED, error=error, exitcode=process.exitcode, seconds=seconds, pid=process.pid)


def _stop(process: Any) -> None:
    process.kill()
    process.join()


def _worker(fn: Callable[..., Any], kwargs: dict[str, Any], result: str, log: Path | None) -> None:
    """The body of one worker process: run ``fn``, write ``(status, value or traceback)`` to ``result``."""
    if log is not None:
        Path(log).parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        for stream in (1, 2):
            os.dup2(descriptor, stream)
        os.close(descriptor)
    code = 0
    try:
        payload = (OK, fn(**kwargs))
        data = pickle.dumps(payload)
    except BaseException:  # a SystemExit or KeyboardInterrupt inside a task is that task's failure too
        text = traceback.format_exc()
        print(text, file=sys.stderr, flush=True)
        data = pickle.dumps((FAILED, text))
        code = 1
    partial = Path(result + ".partial")
    partial.write_bytes(data)
    os.replace(partial, result)
    sys.stdout.flush()
    sys.stderr.flush()
    sys.exit(code)
