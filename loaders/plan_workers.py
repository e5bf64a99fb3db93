"""Plans made side by side in forked worker processes, where the machine has the cores.

A plan that fits nowhere asks for dozens of traced steps the decision does not need
first: the search for the largest batch and the longest sequence at every precision
(planner/solve.py), the advice's changed workloads. Each step is a pure function of its
inputs and runs single-threaded in Python, so independent steps can run at once in other
processes. The process forks (no re-import, no rebuilt inventory: a worker starts with
everything the parent has made) and the plans are sent back pickled. The plans are the
same objects a sequential run makes: the callers (qplan/api.py) only look them up later
in the order they always did, so every report stays byte for byte what it was.

The workers are a pool (``WorkerPool``) that lasts as long as the estimate's ``Plans``:
forked once, at the first round worth spreading, and sent the plans of every later round
one at a time, each as it is free, while this process only hands them out and collects
them. A worker keeps what it made, as one process making every plan would: the prepared
meta models of the groups it planned (a training step's build, peft adapters and k-bit
preparation: a tenth to a fifth of a step), its recorded steps. So a free worker takes the
longest plan of a group it made plans of before, else of the group nobody holds yet with
the most work left, else (idle is worse than preparing again) the shortest of the group
with the most work left. Forked afresh per round with fixed shares (this process making
one), the workers prepared the same groups again every round, and a round lasted as long
as its slowest share: Gemma-3-12B's ORPO plan (56 traces on this repository's 2-core machine)
took 35.9 s of CPU against 29.4 s in one process, and this process waited 3 s in one
round alone. With the pool: 32.4 s of CPU, 18.2 s instead of 21.1 s of wall time.

Anything a worker cannot make (an error, a worker that dies, a plan that does not
pickle) is simply missing: the caller makes it itself when it asks, and an error is
raised there, where a sequential run meets it. Workers never write to the terminal.

Forking is used only where it is safe: a POSIX ``fork``, one Python thread (a forked
child holds only the thread that forked; another's locks would stay held), CUDA not
initialised in this process, not inside a worker. ``QPLAN_WORKERS`` sets how many
processes make plans (1: none forked); the default is the usable cores, at most
``MAX_WORKERS``.
"""

from __future__ import annotations

import contextlib
import gc
import os
import pickle
import signal
import statistics
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Collection, Hashable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from qplan.errors import still_running

if TYPE_CHECKING:
    from multiprocessing.connection import Connection

MAX_WORKERS = 4
ENV = "QPLAN_WORKERS"
# Forking costs more than the fork: both processes then copy each page of memory they
# write to (Python's reference counts write all over the parent's objects). Spreading a
# 70B inference plan's three rounds of small plans anyway made it 0.3 to 0.5 s slower on
# this repository's 2-core machine (0.34-0.40 s alone, 0.64-0.93 s spread). Plans are
# spread only when the work they stand for is several times that.
MIN_SPREAD_SECONDS = 2.0
# How often the parent, waiting for the workers, says it still waits.
WAIT_TICK_S = 1.0

# Set in a worker: it makes what it is sent and forks nothing itself.
_in_worker = False


def worker_count() -> int:
    """How many processes may make plans at once: ``QPLAN_WORKERS`` or the usable cores
    (at most MAX_WORKERS); 1 where forking is not available or not safe now."""
    if (_in_worker or not hasattr(os, "fork") or threading.active_count() != 1
            or _cuda_initialized()):
        return 1
    raw = os.environ.get(ENV, "").strip()
    if raw:
        try:
            return max(1, int(raw))
        except ValueError:
            return 1
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, min(MAX_WORKERS, cores))


def worth_spreading(seconds: Sequence[float], count: int, workers: int) -> bool:
    """Whether ``count`` more plans are worth spreading over ``workers`` processes, by the
    time plans made so far took (``seconds``: those that imported nothing, so that a
    first plan's lazy imports of peft or TRL do not pass for work)."""
    if workers < 2 or count < 2 or not seconds:
        return False
    return statistics.median(seconds) * count >= MIN_SPREAD_SECONDS


def _cuda_initialized() -> bool:
    torch = sys.modules.get("torch")
    return bool(torch is not None and torch.cuda.is_initialized())


def _attempt(task: Callable[[], Any]) -> tuple[bool, Any]:
    try:
        return True, task()
    except Exception:  # made again by the caller, which meets the error where it always did
        return False, None


def _serve(run: Callable[[Any], Any], requests: Connection, results: Connection) -> None:
    """In the forked worker: make each item sent, send back what pickles, till the parent
    closes the pipe; never return."""
    global _in_worker
    _in_worker = True
    status = 0
    try:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        # What the worker inherited is out of its collector's sight: a collection of the
        # oldest generation would otherwise walk every object the parent made (its
        # imports, unless the command line froze them; earlier estimates' kept models),
        # writing to each one's page, which the fork then copies.
        gc.freeze()
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)
        os.dup2(null, 2)
        while True:
            try:
                message = requests.recv_bytes()
            except EOFError:  # the parent closed the pipe: the estimate is over
                break
            index, item = pickle.loads(message)
            ok, value = _attempt(lambda item=item: run(item))
            try:
                data = pickle.dumps((index, ok, value), protocol=pickle.HIGHEST_PROTOCOL)
            except Exception:
                data = pickle.dumps((index, False, None))
            results.send_bytes(data)
    except BaseException:
        status = 1
    finally:
        # No atexit handlers, no flushing of the parent's buffers: the parent owns those.
        os._exit(status)


@dataclass
class _Worker:
    pid: int
    requests: Connection  # the pipe the parent writes items to
    results: Connection  # the pipe the parent reads plans from
    groups: set[Hashable]  # groups it made plans of (or inherited at the fork)
    busy: int | None = None  # the index of the item it is making
    last: Hashable | None = None  # the group of the item it made last


class WorkerPool:
    """Forked processes that make the items sent to them with ``run`` (the same function
    in every process: the one this process had when it forked), one item at a time each,
    and keep what they made for the next round. ``home``: groups whose work this process
    holds now, which every worker inherits."""

    def __init__(self, run: Callable[[Any], Any], count: int,
                 home: Collection[Hashable] = ()) -> None:
        self._workers: list[_Worker] = []
        for _ in range(count):
            try:
                self._fork(run, set(home))
            except OSError:  # no memory or processes left for one: fewer workers
                break

    def __len__(self) -> int:
        return len(self._workers)

    def _fork(self, run: Callable[[Any], Any], home: set[Hashable]) -> None:
        # Imported here, when a pool is forked: most plans never fork one.
        from multiprocessing import Pipe

        # Length-prefixed messages over one-way pipes (multiprocessing's Connection).
        to_worker = Pipe(duplex=False)  # (the worker's end, this process's end)
        try:
            from_worker = Pipe(duplex=False)  # (this process's end, the worker's end)
        except OSError:
            for end in to_worker:
                end.close()
            raise
        try:
            pid = os.fork()
        except OSError:
            for end in (*to_worker, *from_worker):
                end.close()
            raise
        if pid == 0:
            # The other workers' pipes stay with the parent: a worker holding one would
            # keep that worker from seeing its end.
            for other in self._workers:
                other.requests.close()
                other.results.close()
            to_worker[1].close()
            from_worker[0].close()
            _serve(run, to_worker[0], from_worker[1])
        to_worker[0].close()
        from_worker[1].close()
        self._workers.append(_Worker(pid, to_worker[1], from_worker[0], home))

    def map(self, items: Sequence[Any], groups: Sequence[Hashable],
            sizes: Sequence[int] | None = None) -> list[tuple[bool, Any]]:
        """Make ``items`` over the workers, ``groups[i]`` naming the group of item i and
        ``sizes[i]`` (1 each when None) how long it takes relative to the others, as far as
        the caller can tell: for each, (True, its value) or (False, None) where it failed or
        was not made."""
        from multiprocessing.connection import wait

        found: list[tuple[bool, Any]] = [(False, None)] * len(items)
        sizes = list(sizes) if sizes is not None else [1] * len(items)
        left: dict[Hashable, deque[int]] = {}
        # The largest first (a long item started last leaves the other workers idle while
        # it runs), in the order given among equals.
        for index in sorted(range(len(items)), key=lambda i: -sizes[i]):
            left.setdefault(groups[index], deque()).append(index)
        try:
            for worker in list(self._workers):
                self._give(worker, items, groups, sizes, left)
            while busy := [w for w in self._workers if w.busy is not None]:
                ready = wait([w.results for w in busy], WAIT_TICK_S)
                if not ready:
                    count = len(busy)
                    still_running(f"waiting for {count} plan worker{'s' if count > 1 else ''}")
                    continue
                for worker in busy:
                    if worker.results not in ready:
                        continue
                    try:
                        message = worker.results.recv_bytes()
                    except (EOFError, OSError):  # it died: what it was making is missing
                        self._drop(worker, kill=False)
                        continue
                    try:
                        index, ok, value = pickle.loads(message)
                    except Exception:
                        index, ok, value = worker.busy, False, None
                    found[index] = (ok, value)
                    worker.busy = None
                    self._give(worker, items, groups, sizes, left)
                # A worker left idle may take a plan now that another is done with one.
                for idle in [w for w in self._workers if w.busy is None]:
                    self._give(idle, items, groups, sizes, left)
        except BaseException:
            self.close(kill=True)
            raise
        return found

    def _give(self, worker: _Worker, items: Sequence[Any], groups: Sequence[Hashable],
              sizes: Sequence[int], left: dict[Hashable, deque[int]]) -> None:
        """Send ``worker`` its next item, if any is left."""
        while True:
            index = self._next(worker, left, sizes, groups)
            if index is None:
                return
            try:
                message = pickle.dumps((index, items[index]), protocol=pickle.HIGHEST_PROTOCOL)
            except Exception:
                continue  # an item that does not pickle: the caller makes it
            try:
                worker.requests.send_bytes(message)
            except OSError:  # it died: the item goes to another
                left.setdefault(groups[index], deque()).appendleft(index)
                self._drop(worker, kill=False)
                return
            worker.busy = index
            worker.last = groups[index]
            worker.groups.add(groups[index])
            return

    def _next(self, worker: _Worker, left: dict[Hashable, deque[int]],
              sizes: Sequence[int], groups: Sequence[Hashable]) -> int | None:
        """Which item ``worker`` makes next: the next of the group it made its last item
        of, else the largest of the groups it holds, else the largest of the group no
        worker holds with the most work left, else (idle is worse than preparing again)
        the smallest of the group with the most work left, but not the last item of a
        group another worker is making an item of (None: it waits)."""
        open_groups = [g for g, indices in left.items() if indices]
        if not open_groups:
            return None

        def work(group: Hashable) -> int:
            return sum(sizes[i] for i in left[group])

        if worker.last is not None and left.get(worker.last):
            # The group it is on first: a pair of rows, one derived from the other's
            # step, is made back to back.
            return left[worker.last].popleft()
        mine = [g for g in open_groups if g in worker.groups]
        if mine:
            return left[max(mine, key=lambda g: (sizes[left[g][0]], work(g)))].popleft()
        held = set().union(*(w.groups for w in self._workers if w is not worker))
        free = [g for g in open_groups if g not in held]
        if free:
            return left[max(free, key=work)].popleft()
        # Not the last plan of a group another worker is making a plan of now: that one
        # makes it next from what it is making (a double-quantised row's step, derived
        # from the single-quantised one it records: planner/derived_double_quant.py),
        # where this worker would prepare, and trace, it all again.
        making = {groups[w.busy] for w in self._workers
                  if w is not worker and w.busy is not None}
        shared = [g for g in open_groups if len(left[g]) > 1 or g not in making]
        if not shared:
            return None
        return left[max(shared, key=work)].pop()

    def _drop(self, worker: _Worker, kill: bool) -> None:
        self._workers.remove(worker)
        for end in (worker.requests, worker.results):
            with contextlib.suppress(OSError):
                end.close()
        if kill:
            with contextlib.suppress(OSError):
                os.kill(worker.pid, signal.SIGKILL)
        with contextlib.suppress(OSError):
            os.waitpid(worker.pid, 0)

    def close(self, kill: bool = False) -> None:
        """End the workers: a closed pipe ends an idle one; ``kill`` ends them mid-plan."""
        for worker in list(self._workers):
            self._drop(worker, kill=kill or worker.busy is not None)


class Plans:
    """The plans of one estimate, each made once: ``get`` makes one when first asked for
    (``make``) and keeps it under ``key`` (None: not kept), timing it; ``make_ahead``
    makes a list of plans asked for later over the worker pool, when the plans made so far
    say it is worth it. ``group`` names what one worker should make together, ``size`` how
    long a plan takes relative to the others (the largest are made first). ``close`` ends
    the pool (the estimate's end)."""

    def __init__(self, make: Callable[..., Any], key: Callable[..., Hashable | None],
                 group: Callable[..., Hashable], workers: int | None = None,
                 size: Callable[..., int] | None = None) -> None:
        self._make, self._key, self._group = make, key, group
        self._size = size
        self.workers = worker_count() if workers is None else workers
        self._made: dict[Hashable, Any] = {}
        # Seconds of each plan made here that imported no module (what a plan costs).
        self._seconds: list[float] = []
        self._made_here = 0
        self._home: set[Hashable] = set()  # groups this process made plans of
        self._pool: WorkerPool | None = None

    def get(self, *request: Any) -> Any:
        key = self._key(*request)
        plan = self._made.get(key) if key is not None else None
        if plan is None:
            started, modules = time.perf_counter(), len(sys.modules)
            plan = self._make(*request)
            self._made_here += 1
            if len(sys.modules) == modules:
                self._seconds.append(time.perf_counter() - started)
            self._home.add(self._group(*request))
            if key is not None:
                self._made[key] = plan
        return plan

    def known(self, *request: Any) -> Any:
        """The plan for ``request`` if it was made, else None."""
        key = self._key(*request)
        return self._made.get(key) if key is not None else None

    def make_ahead(self, requests: Sequence[tuple]) -> None:
        """Make the plans of ``requests`` not made yet, side by side where several
        processes may run and the work outweighs the fork; ``get`` then finds them."""
        todo: dict[Hashable, tuple] = {}
        for request in requests:
            key = self._key(*request)
            if key is not None and key not in self._made:
                todo.setdefault(key, request)
        if not todo:
            return
        if self._pool is None:
            if self.workers < 2 or len(todo) < 2:
                return
            # What a plan costs, from plans made so far: the first ones made here if need
            # be (the first plans asked for, in the order they are asked).
            while not worth_spreading(self._seconds, len(todo), self.workers):
                if self._made_here >= 2 or len(todo) < 2:
                    return
                try:
                    self.get(*todo.pop(next(iter(todo))))
                except Exception:
                    return  # raised again where it is asked for, as without workers
            self._pool = WorkerPool(self._made_in_worker, self.workers, self._home)
            if not self._pool:
                self._pool = None
                return
        elif len(todo) == 1 and self._group(*next(iter(todo.values()))) in self._home:
            return  # one plan this process holds the group of: made here when asked
        requests = list(todo.values())
        made = self._pool.map(requests, [self._group(*request) for request in requests],
                              [self._size(*request) for request in requests]
                              if self._size is not None else None)
        for key, (ok, plan) in zip(todo, made, strict=True):
            if ok:
                self._made[key] = plan

    def _made_in_worker(self, request: tuple) -> Any:
        return self.get(*request)

    def close(self) -> None:
        """End the worker pool, if one was forked."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()
