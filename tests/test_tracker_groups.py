"""One tensor standing for many storages the log already counted
(``LiveTensorTracker.attach_group``) ends them as a list of tensors, one each, would."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import _disable_current_modes

from qplan.planner.live_tensors import LiveTensorTracker


def _tracker_with(count: int) -> tuple[LiveTensorTracker, list[int]]:
    tracker = LiveTensorTracker()
    tracker.phase = "forward"
    with tracker:
        kept = [torch.empty(100 * (k + 1), dtype=torch.uint8, device="meta")
                for k in range(count)]
    serials = [tracker.serial_of(t) for t in kept]
    for tensor in kept:
        tracker.let_go(tensor)  # the group stands for them from now on
    return tracker, serials


def test_a_group_ends_its_storages_as_a_list_of_one_tensor_each_would():
    # The reference: the same storages each held by a tensor of its own, in a list.
    reference = LiveTensorTracker()
    reference.phase = "forward"
    with reference:
        listed = [torch.empty(100 * (k + 1), dtype=torch.uint8, device="meta")
                  for k in range(5)]
    reference.phase = "backward"
    del listed
    tracker, serials = _tracker_with(5)
    with _disable_current_modes():
        owner = torch.empty(0, device="meta")
    keys = tracker.attach_group(owner, serials, [100 * (k + 1) for k in range(5)])
    assert tracker.live_serials() == set(serials)
    tracker.phase = "backward"
    del owner
    assert tracker._events == reference._events
    assert (tracker.current, tracker.current_allocated, tracker.peak) == (
        reference.current, reference.current_allocated, reference.peak)
    assert not tracker.group_tracked(keys) and not tracker._groups


def test_a_storage_let_go_of_is_not_ended_again():
    tracker, serials = _tracker_with(3)
    with _disable_current_modes():
        owner = torch.empty(0, device="meta")
    keys = tracker.attach_group(owner, serials, [100, 200, 300])
    # What _Releaser.forget does with a storage whose release the caller logs itself.
    del tracker._live[keys[1]]
    assert tracker.group_tracked(keys)
    before = len(tracker._events)
    del owner
    assert [(s, n) for s, n, _, _ in tracker._events[before:]] == [
        (serials[2], -300), (serials[0], -100)]
