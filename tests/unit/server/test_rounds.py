"""Round bookkeeping both policies share: seeded sampling, eligibility, retries (sync replies: test_sync_rounds)."""

from __future__ import annotations

from engine_harness import six_devices
from hypothesis import given
from hypothesis import strategies as st

from fedpeft_edge.config import TrainArgs
from fedpeft_edge.server.rounds import RoundController

_controller = six_devices


def test_sampling_is_seeded_and_resumable() -> None:
    a, b = _controller(), _controller()
    assert a.open_round(0.0).selected == b.open_round(5.0).selected
    resumed = _controller()
    resumed.next_round = 2
    a.close_round(aggregated=True)
    assert a.open_round(0.0).selected == resumed.open_round(0.0).selected


def test_failed_rounds_retry() -> None:
    rc = _controller()
    rc.open_round(0.0)
    rc.close_round(aggregated=False)
    assert rc.next_round == 1
    retry = rc.open_round(20.0)
    assert retry.index == 1 and retry.retry == 1


def test_exhausted_devices_are_never_sampled() -> None:
    rc = _controller()
    for name in ("dev0", "dev1", "dev2"):
        rc.mark_exhausted(name)
    assert set(rc.open_round(0.0).selected) == {"dev3", "dev4", "dev5"}
    rc.close_round(aggregated=True)
    assert rc.next_round == 2


def test_min_devices_gates_only_the_first_round_of_a_server() -> None:
    rc = _controller()
    for name in ("dev3", "dev4", "dev5"):
        rc.set_online(name, False)
    assert rc.can_open()  # 3 online = min_devices
    rc.open_round(0.0)
    rc.close_round(aggregated=True)
    rc.set_online("dev2", False)
    assert rc.can_open()  # 2 online >= min_updates
    resumed = _controller()
    resumed.next_round = 2
    for name in ("dev2", "dev3", "dev4", "dev5"):
        resumed.set_online(name, False)
    assert not resumed.can_open()  # a resumed server waits for min_devices again


_NAMES = [f"dev{i}" for i in range(5)]
_OPS = st.lists(st.tuples(st.sampled_from(["admit", "refuse", "online", "offline", "spend", "join_spent"]),
                          st.sampled_from(_NAMES)), max_size=40)


@given(_OPS)
def test_kept_sets_match_the_flags_after_any_sequence(ops: list[tuple[str, str]]) -> None:
    """eligible / online_count / all_spent are kept as flags change (no scan per join): always as a scan says."""
    rc = RoundController(TrainArgs(client_num_in_total=5, client_num_per_round=2, min_devices=2, min_updates=1,
                                   round_timeout_s=10.0, comm_round=3), seed=1)
    for op, name in ops:
        if op in ("admit", "refuse", "join_spent"):
            rc.admit(name, accepted=op != "refuse", exhausted=op == "join_spent")
        elif op in ("online", "offline"):
            rc.set_online(name, op == "online")
        else:
            rc.mark_exhausted(name)
        devs = rc.devices.values()
        assert rc.eligible() == tuple(sorted(d.device_id for d in devs if d.accepted and d.online and not d.exhausted))
        assert rc.eligible_count() == len(rc.eligible())
        assert rc.online_count() == sum(1 for d in devs if d.accepted and d.online)
        admitted = [d for d in devs if d.accepted]
        assert rc.all_spent() == (bool(admitted) and all(d.exhausted for d in admitted))
        assert rc.can_open() == (len(rc.eligible()) >= 2)
