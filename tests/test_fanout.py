"""The shared fan-out of the evaluation jobs (``vtprune.eval.jobs.fanout``), with tiny tasks on CPU: results come
back in task order, a failing task loses nothing of the others, at most ``jobs`` workers run at once, and the
deadline kills what still runs and starts nothing more."""

from __future__ import annotations

import os
import time

import fanout_tasks
import pytest

from vtprune.eval.jobs import fanout


@pytest.fixture(scope="module")
def fanned(tmp_path_factory):
    """One fan-out of three tasks, two at a time (each worker is a fresh interpreter: run it once for the module).
    The two ``meet`` tasks wait for each other, so they only finish if two workers run at once; the third, which
    fails, starts when one of them has ended."""
    folder = tmp_path_factory.mktemp("fanout")
    (folder / "meet").mkdir()
    meet = {"folder": str(folder / "meet"), "peers": 2}
    tasks = [
        fanout.Task("meet-a", fanout_tasks.meet, {**meet, "name": "a"}, log=folder / "meet-a.log"),
        fanout.Task("meet-b", fanout_tasks.meet, {**meet, "name": "b"}),
        fanout.Task("fail", fanout_tasks.fail, {"message": "this task fails", "stamp": str(folder / "fail.started")},
                    log=folder / "fail.log"),
    ]
    return fanout.run(tasks, jobs=2), folder


def test_outcomes_come_back_in_task_order_with_their_values(fanned) -> None:
    outcomes, _ = fanned
    assert [o.name for o in outcomes] == ["meet-a", "meet-b", "fail"]
    for outcome, name in zip(outcomes[:2], "ab", strict=True):
        assert outcome.ok and outcome.exitcode == 0 and outcome.error is None
        assert outcome.value["name"] == name


def test_a_failing_task_keeps_its_traceback_and_loses_no_other_result(fanned) -> None:
    outcomes, folder = fanned
    failed = outcomes[2]
    assert failed.status == fanout.FAILED and not failed.ok and failed.value is None and failed.exitcode == 1
    assert "ValueError: this task fails" in failed.error and "Traceback" in failed.error
    assert "ValueError: this task fails" in (folder / "fail.log").read_text()  # the worker's stderr
    assert [o.ok for o in outcomes] == [True, True, False]


def test_a_task_log_gets_the_worker_output(fanned) -> None:
    _, folder = fanned
    assert "a is waiting for 1 more" in (folder / "meet-a.log").read_text()
    assert not (folder / "meet-b.log").exists()  # no log: the parent's stdout


def test_at_most_jobs_workers_run_at_once(fanned) -> None:
    outcomes, folder = fanned
    # Both met: two ran together. The third started only once one of them had ended: never three at once.
    assert [o.value["together"] for o in outcomes[:2]] == [2, 2]
    third_started = float((folder / "fail.started").read_text())
    assert third_started >= min(o.value["ended"] for o in outcomes[:2])
    assert len({o.pid for o in outcomes}) == 3  # one fresh process per task


def test_the_deadline_kills_a_running_task_and_starts_no_more(tmp_path) -> None:
    started = time.monotonic()
    tasks = [
        fanout.Task("sleeper", fanout_tasks.sleep, {"seconds": 600, "marker": str(tmp_path / "slept")}),
        fanout.Task("later", fanout_tasks.square, {"x": 2}),
    ]
    sleeper, later = fanout.run(tasks, jobs=1, deadline=1.5)
    assert time.monotonic() - started < 60  # it did not wait for the 600 s sleep
    assert sleeper.status == fanout.KILLED == "killed at the deadline" and not sleeper.ok
    assert sleeper.exitcode is not None and sleeper.exitcode < 0  # ended by a signal
    with pytest.raises(ProcessLookupError):
        os.kill(sleeper.pid, 0)  # the worker is gone, not left behind
    assert later.status == fanout.NOT_STARTED == "not started: deadline" and later.pid is None


def test_a_deadline_already_past_starts_nothing_and_bad_arguments_are_refused() -> None:
    (outcome,) = fanout.run([fanout.Task("x", fanout_tasks.square, {"x": 1})], jobs=1, deadline=0)
    assert outcome.status == fanout.NOT_STARTED
    # A task that cannot be sent to a worker fails alone, in the parent, before any process starts.
    (unsent,) = fanout.run([fanout.Task("lambda", lambda: 1)], jobs=1)
    assert unsent.status == fanout.FAILED and "pickle" in unsent.error.lower() and unsent.pid is None
    with pytest.raises(ValueError, match="jobs must be at least 1"):
        fanout.run([], jobs=0)
    task = fanout.Task("same", fanout_tasks.square, {"x": 1})
    with pytest.raises(ValueError, match="distinct.*same"):
        fanout.run([task, task], jobs=1)
