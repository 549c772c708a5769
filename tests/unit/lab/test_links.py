"""Link profiles, seeded heterogeneous assignment and outage schedules of the lab config."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from fedpeft_edge.config import LabArgs, LinkProfile, OutageArgs, config_from_dict, load_link_profile
from fedpeft_edge.errors import ConfigError
from fedpeft_edge.lab.links import LINKS_DIR, OutageSchedule, assign_links, resolve_link, split_counts
from fedpeft_edge.lab.netns import tbf_args


def test_every_shipped_profile_parses() -> None:
    names = {p.stem for p in LINKS_DIR.glob("*.yaml")}
    assert names >= {"edge", "3g", "lte", "5g", "wifi", "satellite", "1mbit", "10mbit", "100mbit"}
    for name in names:
        prof = resolve_link(name)
        assert prof.name == name and prof.down_mbit and prof.up_mbit
    assert resolve_link("3g").up_mbit == 0.5 and resolve_link("satellite").latency_ms == 300


def test_profile_errors_name_the_value(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("down_mbit: 10\nloss: 1.5\n")
    with pytest.raises(ConfigError, match="loss"):
        load_link_profile(bad)
    bad.write_text("down_mbit: 10\nlatency: 5\n")
    with pytest.raises(ConfigError, match="unknown key.*latency"):
        load_link_profile(bad)
    bad.write_text("latency_ms: 5\njitter_ms: 10\n")
    with pytest.raises(ConfigError, match="jitter_ms"):
        load_link_profile(bad)
    with pytest.raises(ConfigError, match="not found.*known: .*lte"):
        resolve_link("4.5g")


def test_split_counts_sum_and_round() -> None:
    assert split_counts(10, [0.3, 0.5, 0.2]) == [3, 5, 2]
    assert split_counts(7, [0.3, 0.5, 0.2]) == [2, 4, 1]
    assert sum(split_counts(13, [1 / 3] * 3)) == 13


def _profiles(*names: str) -> dict[str, LinkProfile]:
    return {n: LinkProfile(name=n) for n in names}


def test_seeded_fractions_assign_reproducibly() -> None:
    lab = LabArgs(devices=20, links=("3g", "lte", "wifi"), fractions=(0.3, 0.5, 0.2), seed=4)
    a = assign_links(lab, _profiles("3g", "lte", "wifi"))
    assert Counter(p.name for p in a.values()) == {"3g": 6, "lte": 10, "wifi": 4}
    assert a == assign_links(lab, _profiles("3g", "lte", "wifi"))
    other = assign_links(LabArgs(devices=20, links=lab.links, fractions=lab.fractions, seed=5),
                         _profiles("3g", "lte", "wifi"))
    assert [p.name for p in other.values()] != [p.name for p in a.values()]
    assert list(a) == [f"d{i}" for i in range(20)]


def test_explicit_assignment_wins_and_round_robin_fills() -> None:
    lab = LabArgs(devices=4, links=("lte", "3g"), assignment={"d2": "wifi"})
    a = assign_links(lab, _profiles("lte", "3g", "wifi"))
    assert [p.name for p in a.values()] == ["lte", "3g", "wifi", "lte"]


def test_lab_section_is_checked() -> None:
    with pytest.raises(ConfigError, match="sum to"):
        config_from_dict({"lab_args": {"links": ["lte", "3g"], "fractions": [0.5, 0.6]}})
    with pytest.raises(ConfigError, match="device 'd9'"):
        config_from_dict({"lab_args": {"devices": 2, "outages": [{"device": "d9", "duration_s": 5}]}})
    cfg = config_from_dict({"lab_args": {"devices": 3, "outages": [{"device": "d1", "duration_s": 20,
                                                                    "at_round": 2, "after_s": 1.5}]}})
    assert cfg.lab_args.outages == (OutageArgs("d1", 20.0, 2, 1.5),)


def test_outages_fire_once_at_their_round_or_time() -> None:
    lab = LabArgs(devices=2, outages=(OutageArgs("d1", 20, at_round=2, after_s=1.0), OutageArgs("d0", 5, None, 30)))
    s = OutageSchedule.of(lab)
    assert s.due(100.0, started_at=100.0, round_opened={1: 105.0}) == []
    assert s.due(110.5, 100.0, {1: 105.0, 2: 110.0}) == []  # 0.5 s into round 2: not yet
    assert [o.device for o in s.due(111.0, 100.0, {1: 105.0, 2: 110.0})] == ["d1"]
    assert s.due(112.0, 100.0, {1: 105.0, 2: 110.0}) == []  # once
    assert [o.device for o in s.due(130.0, 100.0, {})] == ["d0"]
    assert not s.pending


def test_tbf_bucket_scales_with_rate() -> None:
    assert tbf_args(1, None)[:4] == ["tbf", "rate", "1000000bit", "burst"]
    assert int(tbf_args(1, None)[4]) == 4 * 1514  # 4 ms of 1 Mbit/s is less than 4 frames
    assert int(tbf_args(100, None)[4]) == 50_000
    assert int(tbf_args(10, 32)[4]) == 32 * 1024


def test_without_net_admin_the_lab_names_what_is_missing_and_the_fix() -> None:
    from fedpeft_edge.lab.netns import missing_privileges

    why = missing_privileges(cap_eff=0)
    assert why is not None and "CAP_NET_ADMIN" in why and "--cap-add NET_ADMIN" in why and "root" in why
    assert missing_privileges(cap_eff=(1 << 12) | (1 << 21)) is None
