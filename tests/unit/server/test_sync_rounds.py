"""A synchronous round's replies: drop reasons, quorum, and closing early once every selected device is in."""

from __future__ import annotations

from engine_harness import six_devices

from fedpeft_edge.server.rounds import DropReason
from fedpeft_edge.server.sync_rounds import Replies

_controller = six_devices


def test_drop_reasons_and_quorum() -> None:
    rc = _controller()
    rnd = rc.open_round(0.0)
    rep = Replies(rnd, min_updates=2)
    chosen = list(rnd.selected)
    other = next(d for d in rc.devices if d not in chosen)
    assert rep.judge(chosen[0], True, 1, 1.0) is None
    assert rep.judge(chosen[0], True, 1, 1.0) is DropReason.DUPLICATE
    assert rep.judge(other, True, 1, 1.0) is DropReason.NOT_SELECTED
    assert rep.judge(chosen[1], True, 0, 1.0) is DropReason.STALE_ROUND
    assert rep.judge("stranger", False, 1, 1.0) is DropReason.UNKNOWN_DEVICE
    assert not rep.quorum()
    assert rep.judge(chosen[1], True, 1, 11.0) is DropReason.LATE
    assert rep.judge(chosen[2], True, 1, 2.0) is None
    assert rep.quorum()
    assert dict(rnd.dropped) == {"duplicate": 1, "not_selected": 1, "stale_round": 1, "unknown_device": 1, "late": 1}


def test_offline_devices_let_a_round_close_early_and_return_to_the_wait() -> None:
    rc = _controller()
    rnd = rc.open_round(0.0)
    rep = Replies(rnd, min_updates=2)
    rep.judge(rnd.selected[0], True, 1, 1.0)
    assert not rep.all_in()
    for d in rnd.selected[1:]:
        rep.went_offline(d)
    assert rep.all_in()
    rep.came_online(rnd.selected[0])  # in already: not waited for again
    assert rep.all_in()
    rep.came_online(rnd.selected[1])
    assert rep.waiting == {rnd.selected[1]}
    rep.fail(rnd.selected[1])
    rep.came_online(rnd.selected[1])  # failed: not waited for again
    assert rep.all_in()
