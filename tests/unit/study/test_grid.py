"""The study grid expands as documented: order, run ids, per-method overrides, bundles, excludes, bad keys."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from fedpeft_edge.config import load_study_config
from fedpeft_edge.errors import ConfigError
from fedpeft_edge.study.grid import config_hash, expand_study

REPO = Path(__file__).resolve().parents[3]


def _study(tmp_path: Path, **fields: Any) -> Path:
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump({"peft_args": {"method": "bias"}, "train_args": {"learning_rate": 0.01}}))
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({"name": "s", "base_config": "base.yaml", **fields}, sort_keys=False))
    return path


def test_order_ids_and_values(tmp_path: Path) -> None:
    path = _study(tmp_path, grid={"peft_args.method": ["head", "bias"], "train_args.learning_rate": [0.01, 0.003],
                                  "common_args.random_seed": [0, 1]})
    runs = expand_study(load_study_config(path))
    assert [r.run_id for r in runs[:4]] == [
        "method-head_lr-0.01_seed-0", "method-head_lr-0.01_seed-1",
        "method-head_lr-0.003_seed-0", "method-head_lr-0.003_seed-1"]
    assert len(runs) == 8 and [r.index for r in runs] == list(range(8))
    last = runs[-1]
    assert last.run_id == "method-bias_lr-0.003_seed-1"
    assert (last.method, last.config.train_args.learning_rate, last.config.common_args.random_seed) == \
        ("bias", 0.003, 1)
    assert last.config.common_args.run_id == last.run_id
    # stable: the same file plans the same ids and hashes again
    again = expand_study(load_study_config(path))
    assert [(r.run_id, r.config_hash) for r in again] == [(r.run_id, r.config_hash) for r in runs]
    assert len({r.config_hash for r in runs}) == 8


def test_per_method_overrides_and_precedence(tmp_path: Path) -> None:
    path = _study(tmp_path, grid={"peft_args.method": ["head", "full", "lora"]},
                  overrides={"train_args.comm_round": 3, "train_args.learning_rate": 0.05},
                  per_method={"full": {"train_args.learning_rate": 0.001}, "lora": {"train_args.epochs": 2}})
    runs = {r.method: r.config for r in expand_study(load_study_config(path))}
    assert runs["full"].train_args.learning_rate == 0.001  # per_method beats overrides
    assert runs["head"].train_args.learning_rate == 0.05  # overrides beat the base
    assert runs["lora"].train_args.epochs == 2 and runs["head"].train_args.epochs == 1
    assert {c.train_args.comm_round for c in runs.values()} == {3}


def test_per_method_clash_with_the_grid_is_an_error(tmp_path: Path) -> None:
    path = _study(tmp_path, grid={"peft_args.method": ["head"], "train_args.learning_rate": [0.1]},
                  per_method={"head": {"train_args.learning_rate": 0.01}})
    with pytest.raises(ConfigError, match="train_args.learning_rate"):
        expand_study(load_study_config(path))


def test_bundles_and_exclude(tmp_path: Path) -> None:
    privacy = {"no_dp": {"dp_args.enabled": False},
               "eps5": {"dp_args.enabled": True, "dp_args.target_epsilon": 5.0}}
    path = _study(tmp_path, grid={"peft_args.method": ["head", "full"], "privacy": privacy},
                  exclude=[{"peft_args.method": "full", "dp_args.enabled": True}])
    runs = expand_study(load_study_config(path))
    assert [r.run_id for r in runs] == ["method-head_privacy-no_dp", "method-head_privacy-eps5",
                                        "method-full_privacy-no_dp"]
    assert runs[1].config.dp_args.target_epsilon == 5.0 and runs[1].config.dp_args.enabled
    assert runs[1].values == {"peft_args.method": "head", "privacy": "eps5"}


@pytest.mark.parametrize(("fields", "needle"), [
    ({"grid": {"train_args.learnig_rate": [0.1]}}, "'learnig_rate'"),
    ({"grid": {"bogus_args.x": [1]}}, "'bogus_args'"),
    ({"grid": {"train_args.learning_rate": ["fast"]}}, "train_args.learning_rate"),
    ({"grid": {"train_args.learning_rate": []}}, "non-empty list"),
    ({"grid": {"privacy": [1, 2]}}, "bundle axis"),
    ({"overrides": {"peft_args.methd": "full"}}, "'methd'"),
    ({"per_method": {"magic": {}}}, "'magic'"),
    ({"per_method": {"bias": {"train_args.lr": 0.1}}}, "'lr'"),
    ({"exclude": [{"train_args.nope": 1}]}, "'train_args.nope'"),
    ({"grid": {"peft_args.method": ["head"]}, "colour": "red"}, "'colour'"),
])
def test_unknown_or_bad_keys_are_config_errors_naming_the_key(tmp_path: Path, fields: dict[str, Any],
                                                               needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        expand_study(load_study_config(_study(tmp_path, **fields)))


def test_missing_base_config_named(tmp_path: Path) -> None:
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({"name": "s", "base_config": "nowhere.yaml"}))
    with pytest.raises(ConfigError, match="nowhere.yaml"):
        load_study_config(path)


def test_hash_ignores_where_a_run_goes_but_not_what_it_computes(tmp_path: Path) -> None:
    from fedpeft_edge.config import replace_in

    run = expand_study(load_study_config(_study(tmp_path, grid={"peft_args.method": ["head"]})))[0]
    moved = replace_in(run.config, **{"tracking_args.run_dir": "/elsewhere", "comm_args.broker_port": 4321})
    assert config_hash(moved) == run.config_hash
    assert config_hash(replace_in(run.config, **{"train_args.learning_rate": 0.5})) != run.config_hash


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "configs" / "studies").glob("*.yaml")))
def test_shipped_studies_expand(name: str) -> None:
    runs = expand_study(load_study_config(REPO / "configs" / "studies" / name))
    assert runs and len({r.run_id for r in runs}) == len(runs)
