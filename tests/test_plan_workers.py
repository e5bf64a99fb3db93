"""Plans made side by side in forked workers (loaders/plan_workers.py): the same reports,
made partly in other processes, and nothing lost or hung when a worker fails."""

from __future__ import annotations

import os
import sys
import threading
from dataclasses import replace

import pytest

from qplan.api import estimate, resolve
from qplan.loaders import plan_workers
from qplan.loaders.measure import shrink
from qplan.planner.solve import PROBES, solve_for, values_ahead
from qplan.report import report_json

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")


def make_all(tasks, groups, workers):
    """One round of ``tasks`` (callables) over a pool of up to ``workers`` processes."""
    pool = plan_workers.WorkerPool(lambda index: tasks[index](), min(workers, len(tasks)))
    try:
        return pool.map(range(len(tasks)), groups)
    finally:
        pool.close()


def test_every_task_runs_in_a_worker_and_comes_back():
    tasks = [os.getpid] * 4
    found = make_all(tasks, ["a", "a", "b", "b"], workers=2)
    assert all(ok for ok, _ in found)
    pids = {pid for _, pid in found}
    # This process hands the tasks out and collects them: the workers make them all.
    assert os.getpid() not in pids and 1 <= len(pids) <= 2


def _worker(*groups: str) -> plan_workers._Worker:
    return plan_workers._Worker(pid=0, requests=-1, results=-1, groups=set(groups))


GROUPS = ["a", "a", "b", "b", "b", "c", "d", "d"]


def test_a_worker_takes_its_own_groups_then_free_ones_then_the_largest_from_its_end():
    from collections import deque

    pool = plan_workers.WorkerPool(lambda item: item, 0)
    one, two = _worker("a"), _worker("b")
    pool._workers = [one, two]
    sizes = [1] * 8
    left = {"a": deque([0, 1]), "b": deque([2, 3, 4]), "c": deque([5]), "d": deque([6, 7])}
    # Its own group first (where its prepared model is), from the front.
    assert pool._next(one, left, sizes, GROUPS) == 0
    assert pool._next(one, left, sizes, GROUPS) == 1
    # Then the largest group no worker holds.
    assert pool._next(one, left, sizes, GROUPS) == 6
    one.groups.add("d")
    assert pool._next(two, left, sizes, GROUPS) == 2
    left["d"].clear()
    assert pool._next(one, left, sizes, GROUPS) == 5
    one.groups.add("c")
    # Then, idle being worse than preparing again, the group with the most left, from
    # the end its holder does not reach first.
    assert pool._next(one, left, sizes, GROUPS) == 4
    assert pool._next(two, left, sizes, GROUPS) == 3
    assert pool._next(one, left, sizes, GROUPS) is None


def test_a_worker_finishes_its_group_and_leaves_the_last_item_of_one_being_made():
    """A pair of rows, one derived from the other's step as it is recorded
    (planner/derived_double_quant.py), is made back to back by one worker: another one
    waits rather than take the second and trace the first again."""
    from collections import deque

    pool = plan_workers.WorkerPool(lambda item: item, 0)
    one, two = _worker(), _worker()
    pool._workers = [one, two]
    groups = ["p", "p", "q", "q"]
    sizes = [1, 1, 1, 1]
    left = {"p": deque([0, 1]), "q": deque([2, 3])}
    one.busy, one.last = 0, "p"
    one.groups.add("p")
    left["p"].popleft()
    two.busy, two.last = 2, "q"
    two.groups.add("q")
    left["q"].popleft()
    # "two" is done: it goes on with its group; and waits rather than take "p"'s last
    # item, which "one" is making the first of.
    two.busy = None
    assert pool._next(two, left, sizes, groups) == 3
    assert pool._next(two, left, sizes, groups) is None
    # Once "one" makes nothing of "p", its last item may go to another.
    one.busy = None
    assert pool._next(two, left, sizes, groups) == 1


def test_the_longest_items_go_first():
    # One worker, so the order it is given the items in is the order they are made.
    order: list[str] = []
    pool = plan_workers.WorkerPool(lambda item: item, 1)
    try:
        found = pool.map(["short", "long", "middle", "long too"], ["a", "a", "a", "b"],
                         [1, 16, 4, 16])
    finally:
        pool.close()
    assert [value for _, value in found] == ["short", "long", "middle", "long too"]
    left: dict = {}
    sizes = [1, 16, 4, 16]
    from collections import deque

    for index in sorted(range(4), key=lambda i: -sizes[i]):
        left.setdefault("ab"[index == 3], deque()).append(index)
    worker = _worker()
    pool._workers = [worker]
    while (index := pool._next(worker, left, sizes, ["a", "a", "a", "b"])) is not None:
        order.append(index)
        worker.groups.add("ab"[index == 3])
    # The largest of the group with the most work, then the rest of that group (it holds
    # it now: its prepared model is there), largest first, then the other group.
    assert order == [1, 2, 0, 3]


def test_the_pool_lasts_across_rounds_and_its_workers_keep_what_they_made():
    made: list[str] = []

    def run(item: str) -> tuple[int, list[str]]:
        made.append(item)  # in the worker: what it has made so far
        return os.getpid(), list(made)

    pool = plan_workers.WorkerPool(run, 2)
    try:
        first = pool.map(["a1", "b1"], ["a", "b"])
        second = pool.map(["b2", "a2"], ["b", "a"])
    finally:
        pool.close()
    by_item = {item: value for item, (ok, value) in
               zip(["a1", "b1", "b2", "a2"], [*first, *second], strict=True) if ok}
    assert len(by_item) == 4 and made == []  # nothing made in this process
    # Each group went back to the worker that made it, which still held its first plan.
    assert by_item["a2"][0] == by_item["a1"][0] and by_item["a2"][1][-2:] == ["a1", "a2"]
    assert by_item["b2"][0] == by_item["b1"][0] and by_item["b2"][1][-2:] == ["b1", "b2"]
    with pytest.raises(ChildProcessError):  # closed: every worker ended and reaped
        os.waitpid(-1, os.WNOHANG)


def test_a_worker_collects_only_what_it_made():
    import gc

    # Everything the parent made is frozen in the worker (never walked by its collector,
    # so never written to and copied); this process's own collector is left as it was.
    frozen_here = gc.get_freeze_count()
    found = make_all([gc.get_freeze_count] * 2, ["a", "b"], workers=2)
    assert all(ok and count > frozen_here + 1000 for ok, count in found)
    assert gc.get_freeze_count() == frozen_here


def test_a_failed_task_or_worker_leaves_its_plans_to_the_caller():
    def fails():
        raise ValueError("no plan")

    def dies():
        os._exit(3)

    tasks = [lambda: 1, fails, lambda: 3, dies, lambda: (lambda: None), lambda: 6]
    groups = ["many", "many", "many", "dies", "unpicklable", "many"]
    found = make_all(tasks, groups, workers=3)
    assert found[0] == (True, 1) and found[2] == (True, 3) and found[5] == (True, 6)
    assert found[1] == (False, None)  # the error is met again where the caller asks
    assert found[3] == (False, None)  # a worker that died
    assert found[4] == (False, None)  # a value that does not pickle


def test_a_fork_that_fails_leaves_the_tasks_to_the_caller(monkeypatch):
    def no_fork():
        raise OSError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(os, "fork", no_fork)
    found = make_all([lambda: 1, lambda: 2], ["a", "b"], workers=2)
    assert found == [(False, None), (False, None)]


def test_an_interrupt_takes_the_workers_with_it(monkeypatch):
    import time

    def interrupted(*args):
        raise KeyboardInterrupt  # Ctrl-C while this process waits for the workers

    import multiprocessing.connection

    monkeypatch.setattr(multiprocessing.connection, "wait", interrupted)
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        make_all([lambda: time.sleep(60), lambda: time.sleep(60)], ["a", "b"],
                              workers=2)
    assert time.monotonic() - started < 30
    with pytest.raises(ChildProcessError):  # the workers were killed and reaped
        os.waitpid(-1, os.WNOHANG)


def test_waiting_for_a_worker_is_told_once_a_second_under_the_current_step(monkeypatch):
    import time

    from qplan.errors import current_step, enter_step, on_step

    monkeypatch.setattr(plan_workers, "WAIT_TICK_S", 0.1)
    heard: list[str] = []
    enter_step("planning lora at nf4")
    with on_step(heard.append):
        # One worker's task is quick, the other's takes a while.
        found = make_all([lambda: 1, lambda: time.sleep(0.6) or 2], ["a", "b"],
                                      workers=2)
    assert found == [(True, 1), (True, 2)]
    assert heard.count("waiting for 1 plan worker") >= 3
    assert set(heard) <= {"waiting for 1 plan worker", "waiting for 2 plan workers"}
    assert current_step() == "planning lora at nf4"  # what an error would name


def test_one_process_makes_nothing_ahead():
    calls = []
    plans = plan_workers.Plans(lambda name: calls.append(name) or name, lambda name: name,
                               lambda name: name, workers=1)
    plans.make_ahead([("a",), ("b",), ("c",)])
    found = [plans.known(name) for name in "abc"]
    assert found == [None] * 3 and calls == []
    assert plans._pool is None  # nothing forked


def _alone(monkeypatch):
    # Threads other tests leave running in this process (tqdm's monitor after a
    # from_pretrained progress bar) would keep the workers off: these tests fork anyway.
    monkeypatch.setattr(plan_workers.threading, "active_count", lambda: 1)


def test_worker_count_follows_the_setting_and_stays_single_with_threads(monkeypatch):
    _alone(monkeypatch)
    monkeypatch.setenv("QPLAN_WORKERS", "3")
    assert plan_workers.worker_count() == 3
    monkeypatch.setenv("QPLAN_WORKERS", "many")
    assert plan_workers.worker_count() == 1
    monkeypatch.delenv("QPLAN_WORKERS")
    assert 1 <= plan_workers.worker_count() <= plan_workers.MAX_WORKERS
    # Another thread's locks would stay held in a forked child: no fork then.
    monkeypatch.undo()
    monkeypatch.setenv("QPLAN_WORKERS", "3")
    release = threading.Event()
    other = threading.Thread(target=release.wait)
    other.start()
    try:
        assert threading.active_count() > 1
        assert plan_workers.worker_count() == 1
    finally:
        release.set()
        other.join()


def test_plans_are_spread_only_when_their_work_outweighs_the_fork():
    assert not plan_workers.worth_spreading([0.01, 0.02], 20, 2)
    assert plan_workers.worth_spreading([0.5, 0.4], 20, 2)
    assert not plan_workers.worth_spreading([], 20, 2)  # nothing to go by yet
    assert not plan_workers.worth_spreading([0.5], 20, 1)
    assert not plan_workers.worth_spreading([9.0], 1, 2)


def test_a_plan_that_imported_a_module_does_not_time_a_plan(monkeypatch):
    # A first plan's lazy imports are not what the next plans cost: it is made here, then
    # a second one, which times a plan, before anything is spread.
    monkeypatch.setattr(plan_workers.WorkerPool, "map",
                        lambda self, items, *args: [(False, None)] * len(items))

    def make(name: str) -> str:
        if name == "first":
            sys.modules["qplan_test_imported_by_a_plan"] = sys  # as a lazy import would
        return name

    plans = plan_workers.Plans(make, lambda name: name, lambda name: name, workers=2)
    try:
        plans.make_ahead([("first",), ("second",), ("third",), ("fourth",)])
    finally:
        sys.modules.pop("qplan_test_imported_by_a_plan", None)
    assert plans.known("first") == "first" and plans.known("second") == "second"
    assert plans.known("third") is None  # tiny plans: not worth a fork, made when asked
    assert len(plans._seconds) == 1


@pytest.mark.parametrize("variable", ["batch", "seq_len"])
@pytest.mark.parametrize("limit", [10, 5_000, 60_000, 10**9])
def test_searches_ahead_ask_for_what_the_solver_asks(variable, limit):
    # Quadratic totals (eager attention's scores), limits that fit nothing, some, all.
    def total(x: int) -> int:
        return 100 + 3 * x + x * x // 200

    asked: list[int] = []
    solution = solve_for("bf16", variable, lambda x: asked.append(x) or total(x), limit, 4096)
    known: dict[tuple[int, int], int] = {}
    rounds: list[list[tuple[int, int]]] = []

    def fetch(missing):
        rounds.append(missing)
        known.update({(i, x): total(x) for i, x in missing})

    values_ahead([(variable, limit, 4096)] * 2, lambda i, x: known.get((i, x)), fetch)
    # Every value the solver traces is made ahead, for both problems, and nothing else.
    assert {x for i, x in known if i == 0} == set(asked)
    assert {x for i, x in known if i == 1} == set(asked)
    assert solution.evaluations == len(asked)
    # The first round holds every first probe of both searches at once.
    assert len(rounds[0]) == 2 * len({min(p, 4096) for p in PROBES[variable]})


def test_a_value_that_cannot_be_made_stops_only_its_search():
    def fetch(missing):
        known.update({(i, x): 10 * x for i, x in missing if i == 1})

    known: dict[tuple[int, int], int] = {}
    values_ahead([("batch", 100, 4096), ("batch", 100, 4096)],
                 lambda i, x: known.get((i, x)), fetch)
    assert not any(i == 0 for i, _ in known)
    # The second search went on past its first round (its confirmation at 10).
    assert (1, 10) in known


def _small(model: str):
    spec = resolve(model, None, False)
    return replace(spec, config=shrink(spec.config, 6))


@pytest.mark.parametrize(("mode", "precisions"), [("lora", "bf16,nf4"),
                                                  ("inference", "bf16,nf4")])
def test_plans_made_in_workers_give_the_same_report(monkeypatch, mode, precisions):
    # Nothing fits: the report solves batch and seq_len at every candidate and plans the
    # advice's changed workloads, the plans the workers make ahead.
    from qplan.planner import components

    made_here = []
    real = components.workload_components

    def counted(*args, **kwargs):
        made_here.append(args[1])
        return real(*args, **kwargs)

    monkeypatch.setattr("qplan.api.workload_components", counted)
    # Tiny plans take milliseconds: spread them all the same.
    monkeypatch.setattr(plan_workers, "MIN_SPREAD_SECONDS", 0.0)
    _alone(monkeypatch)
    options = dict(gpu="800MiB", mode=mode, seq_len=32, precisions=precisions)
    spec = _small("Qwen/Qwen3-0.6B")
    monkeypatch.setenv("QPLAN_WORKERS", "1")
    alone = report_json(estimate(spec, **options))
    in_one = len(made_here)
    made_here.clear()
    monkeypatch.setenv("QPLAN_WORKERS", "2")
    together = report_json(estimate(spec, **options))
    assert '"solutions": []' not in alone
    assert together == alone
    with pytest.raises(ChildProcessError):  # the estimate ended its workers
        os.waitpid(-1, os.WNOHANG)
    # Some of the plans were made in the worker, out of this process.
    assert 0 < len(made_here) < in_one
