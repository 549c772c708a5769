"""Round bookkeeping: seeded sampling, drop reasons, quorum and retries."""

from __future__ import annotations

from fedpeft_edge.config import TrainArgs
from fedpeft_edge.server.rounds import DropReason, RoundController


def _controller(**kw: object) -> RoundController:
    args = TrainArgs(client_num_in_total=6, client_num_per_round=3, min_devices=3, min_updates=2,
                     round_timeout_s=10.0, comm_round=3, **kw)  # type: ignore[arg-type]
    rc = RoundController(args, seed=7)
    for i in range(6):
        d = rc.device(f"dev{i}")
        d.accepted = d.online = True
    return rc


def test_sampling_is_seeded_and_resumable() -> None:
    a, b = _controller(), _controller()
    assert a.open_round(0.0).selected == b.open_round(5.0).selected
    resumed = _controller()
    resumed.next_round = 2
    a.close_round(aggregated=True)
    assert a.open_round(0.0).selected == resumed.open_round(0.0).selected


def test_drop_reasons_and_quorum() -> None:
    rc = _controller()
    rnd = rc.open_round(0.0)
    chosen = list(rnd.selected)
    other = next(d for d in rc.devices if d not in chosen)
    assert rc.judge_update(chosen[0], 1, 1.0) is None
    assert rc.judge_update(chosen[0], 1, 1.0) is DropReason.DUPLICATE
    assert rc.judge_update(other, 1, 1.0) is DropReason.NOT_SELECTED
    assert rc.judge_update(chosen[1], 0, 1.0) is DropReason.STALE_ROUND
    assert rc.judge_update("stranger", 1, 1.0) is DropReason.UNKNOWN_DEVICE
    assert not rc.quorum()
    assert rc.judge_update(chosen[1], 1, 11.0) is DropReason.LATE
    assert rc.judge_update(chosen[2], 1, 2.0) is None
    assert rc.quorum()
    assert dict(rnd.dropped) == {"duplicate": 1, "not_selected": 1, "stale_round": 1, "unknown_device": 1, "late": 1}


def test_offline_devices_let_a_round_close_early_and_failed_rounds_retry() -> None:
    rc = _controller()
    rnd = rc.open_round(0.0)
    rc.judge_update(rnd.selected[0], 1, 1.0)
    assert not rc.all_in()
    for d in rnd.selected[1:]:
        rc.set_online(d, False)
    assert rc.all_in()
    rc.close_round(aggregated=False)
    assert rc.next_round == 1
    for dev in rc.devices.values():
        dev.online = True
    retry = rc.open_round(20.0)
    assert retry.index == 1 and retry.attempt == 1


def test_exhausted_devices_are_never_sampled() -> None:
    rc = _controller()
    for name in ("dev0", "dev1", "dev2"):
        rc.devices[name].exhausted = True
    assert set(rc.open_round(0.0).selected) == {"dev3", "dev4", "dev5"}
    rc.close_round(aggregated=True)
    assert rc.next_round == 2


def test_min_devices_gates_only_the_first_round_of_a_server() -> None:
    rc = _controller()
    for name in ("dev3", "dev4", "dev5"):
        rc.devices[name].online = False
    assert rc.can_open()  # 3 online = min_devices
    rc.open_round(0.0)
    rc.close_round(aggregated=True)
    rc.devices["dev2"].online = False
    assert rc.can_open()  # 2 online >= min_updates
    resumed = _controller()
    resumed.next_round = 2
    for name in ("dev2", "dev3", "dev4", "dev5"):
        resumed.devices[name].online = False
    assert not resumed.can_open()  # a resumed server waits for min_devices again
