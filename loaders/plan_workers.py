"""Plans made side by side in forked worker processes, where the machine has the cores.

A plan that fits nowhere asks for dozens of traced steps the decision does not need
first: the search for the largest batch and the longest sequence at every precision
(planner/solve.py), the advice's changed workloads. Each step is a pure function of its
inputs and runs single-threaded in Python, so independent steps can run at once in other
processes. The process forks (no re-import, no rebuilt inventory: a worker starts with
everything the parent has made), each worker makes its share and sends the plans back
pickled; the parent makes its own share meanwhile. The plans are the same objects a
sequential run makes: the callers (qplan/api.py) only look them up later in the order
they always did, so every report stays byte for byte what it was.

Anything a worker cannot make (an error, a worker that dies, a plan that does not
pickle) is simply missing: the caller makes it itself when it asks, and an error is
raised there, where a sequential run meets it. Workers never write to the terminal.

Forking is used only where it is safe: a POSIX ``fork``, one Python thread (a forked
child holds only the thread that forked; another's locks would stay held), CUDA not
initialised in this process. ``QPLAN_WORKERS`` sets how many processes (1: none forked);
the default is the usable cores, at most ``MAX_WORKERS``.
"""

from __future__ import annotations

import contextlib
import functools
import os
import pickle
import select
import signal
import statistics
import sys
import threading
import time
from collections.abc import Callable, Collection, Hashable, Sequence
from typing import Any

from qplan.errors import still_running

MAX_WORKERS = 4
ENV = "QPLAN_WORKERS"
# Forking costs more than the fork: both processes then copy each page of memory they
# write to (Python's reference counts write all over the parent's objects). Spreading a
# 70B inference plan's three rounds of small plans anyway made it 0.3 to 0.5 s slower on
# this repository's 2-core machine (0.34-0.40 s alone, 0.64-0.93 s spread). Plans are
# spread only when the work they stand for is several times that.
MIN_SPREAD_SECONDS = 2.0
# How often the parent, its own share done, says it still waits for the workers.
WAIT_TICK_S = 1.0


def worker_count() -> int:
    """How many processes may make plans at once: ``QPLAN_WORKERS`` or the usable cores
    (at most MAX_WORKERS); 1 where forking is not available or not safe now."""
    if not hasattr(os, "fork") or threading.active_count() != 1 or _cuda_initialized():
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


def _shares(groups: Sequence[Hashable], workers: int,
            home: Collection[Hashable] = ()) -> list[list[int]]:
    """Task indices per process, whole groups together (a group's steps reuse each
    other's prepared model or recording), the first share this process's own: the groups
    it made plans of before (``home``: their prepared models are here) while it has no
    more than its part, then the largest groups first to the least loaded."""
    members: dict[Hashable, list[int]] = {}
    for index, group in enumerate(groups):
        members.setdefault(group, []).append(index)
    shares: list[list[int]] = [[] for _ in range(min(workers, len(members)))]
    part = -(-len(groups) // max(1, len(shares)))
    for group, indices in sorted(members.items(),
                                 key=lambda item: (item[0] not in home, -len(item[1]))):
        if group in home and len(shares[0]) + len(indices) <= part:
            shares[0].extend(indices)
        else:
            min(shares, key=len).extend(indices)
    return [sorted(share) for share in shares]


def _attempt(task: Callable[[], Any]) -> tuple[bool, Any]:
    try:
        return True, task()
    except Exception:  # made again by the caller, which meets the error where it always did
        return False, None


def _child(share: list[int], tasks: Sequence[Callable[[], Any]], write_fd: int) -> None:
    """In the forked worker: make the share, send what pickles, never return."""
    status = 0
    try:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)
        os.dup2(null, 2)
        made = {}
        for index in share:
            ok, value = _attempt(tasks[index])
            if ok:
                made[index] = value
        try:
            data = pickle.dumps(made, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception:
            data = pickle.dumps({})
        with os.fdopen(write_fd, "wb") as pipe:
            pipe.write(data)
    except BaseException:
        status = 1
    finally:
        # No atexit handlers, no flushing of the parent's buffers: the parent owns those.
        os._exit(status)


def make_all(tasks: Sequence[Callable[[], Any]], groups: Sequence[Hashable],
             workers: int | None = None, home: Collection[Hashable] = ()
             ) -> list[tuple[bool, Any]]:
    """Run ``tasks`` (no arguments each), ``groups[i]`` naming the group of task i, over
    up to ``workers`` processes (``worker_count()`` when None), this one taking the
    ``home`` groups it can: for each task, (True, its value) or (False, None) where it
    failed or was not made. With one process nothing is made (the caller makes each when
    it asks, in its own order)."""
    workers = worker_count() if workers is None else workers
    found: list[tuple[bool, Any]] = [(False, None)] * len(tasks)
    shares = _shares(groups, workers, home)
    if len(shares) < 2:
        return found
    children: list[tuple[int, int]] = []
    try:
        for share in shares[1:]:
            try:
                read_fd, write_fd = os.pipe()
            except OSError:
                break
            try:
                pid = os.fork()
            except OSError:  # no memory or processes left for one: its share waits
                os.close(read_fd)
                os.close(write_fd)
                break
            if pid == 0:
                os.close(read_fd)
                _child(share, tasks, write_fd)
            os.close(write_fd)
            children.append((pid, read_fd))
        for index in shares[0]:
            found[index] = _attempt(tasks[index])
        while children:
            pid, read_fd = children[0]
            # A worker writes its plans when its share is done: till then, say so once a
            # second (the progress line would otherwise stand still, like a hang).
            while not select.select([read_fd], [], [], WAIT_TICK_S)[0]:
                left = len(children)
                still_running(f"waiting for {left} plan worker{'s' if left > 1 else ''}")
            with os.fdopen(read_fd, "rb", closefd=False) as pipe:
                data = pipe.read()
            os.close(read_fd)
            os.waitpid(pid, 0)
            children.pop(0)
            try:
                made = pickle.loads(data) if data else {}
            except Exception:
                made = {}
            for index, value in made.items():
                found[index] = (True, value)
    finally:
        for pid, read_fd in children:  # interrupted: the workers not yet reaped go too
            with contextlib.suppress(OSError):
                os.close(read_fd)
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(OSError):
                os.waitpid(pid, 0)
    return found


class Plans:
    """The plans of one estimate, each made once: ``get`` makes one when first asked for
    (``make``) and keeps it under ``key`` (None: not kept), timing it; ``make_ahead``
    makes a list of plans asked for later side by side over the workers, when the plans
    made so far say it is worth it. ``group`` names what one worker should make together."""

    def __init__(self, make: Callable[..., Any], key: Callable[..., Hashable | None],
                 group: Callable[..., Hashable], workers: int | None = None) -> None:
        self._make, self._key, self._group = make, key, group
        self.workers = worker_count() if workers is None else workers
        self._made: dict[Hashable, Any] = {}
        # Seconds of each plan made here that imported no module (what a plan costs).
        self._seconds: list[float] = []
        self._made_here = 0
        self._home: set[Hashable] = set()  # groups this process made plans of

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
        if self.workers < 2 or len(todo) < 2:
            return
        # What a plan costs, from plans made so far: the first ones made here if need be
        # (the first plans asked for, in the order they are asked).
        while not worth_spreading(self._seconds, len(todo), self.workers):
            if self._made_here >= 2 or len(todo) < 2:
                return
            try:
                self.get(*todo.pop(next(iter(todo))))
            except Exception:
                return  # raised again where it is asked for, as without workers
        made = make_all([functools.partial(self.get, *request) for request in todo.values()],
                        [self._group(*request) for request in todo.values()], self.workers,
                        self._home)
        for key, (ok, plan) in zip(todo, made, strict=True):
            if ok:
                self._made[key] = plan
