"""Config parsing: FedML sections into frozen dataclasses; unknown keys and bad values name the key."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from fedpeft_edge.config import RunConfig, config_from_dict, dump_config, load_config, replace_in
from fedpeft_edge.errors import ConfigError

REPO = Path(__file__).resolve().parents[3]


def test_defaults_and_frozen() -> None:
    cfg = config_from_dict({})
    assert cfg.peft_args.method == "bias"
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train_args.comm_round = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        ({"train_args": {"comm_rounds": 3}}, "'comm_rounds'"),
        ({"bogus_args": {}}, "'bogus_args'"),
        ({"train_args": {"comm_round": "three"}}, "train_args.comm_round"),
        ({"train_args": {"comm_round": 0}}, "train_args.comm_round"),
        ({"peft_args": {"method": "magic"}}, "peft_args.method"),
        ({"peft_args": {"adapter": {"widht": 3}}}, "'widht'"),
        ({"train_args": {"nesterov": "yes"}}, "train_args.nesterov"),
        ({"comm_args": {"broker_port": 70000}}, "comm_args.broker_port"),
        ({"comm_args": {"chunk_bytes": 100}}, "comm_args.chunk_bytes"),
        ({"comm_args": {"min_link_rate_bps": 0}}, "comm_args.min_link_rate_bps"),
        ({"comm_args": {"inflight_bytes": -1}}, "comm_args.inflight_bytes"),
        ({"comm_args": {"model_delivery": "broadcast"}}, "comm_args.model_delivery"),
        ({"train_args": {"client_num_per_round": 9, "client_num_in_total": 4}}, "client_num_per_round"),
        ({"model_args": {"weights": "file"}}, "checkpoint_path"),
        ({"dp_args": {"enabled": True}}, "noise_multiplier"),
        ({"peft_args": {"lora": {"aggregation": "hetlora"}}}, "peft_args.lora.aggregation"),
        ({"peft_args": {"lora": {"r": 4, "rank_min": 5}}}, "peft_args.lora.rank_min"),
        ({"peft_args": {"lora": {"rank_memory_mb": [4096, 1024]}}}, "peft_args.lora.rank_memory_mb"),
        ({"peft_args": {"lora": {"aggregation": "flexlora"}}, "train_args": {"federated_optimizer": "FedMedian"}},
         "flexlora"),
        ({"peft_args": {"lora": {"aggregation": "flexlora"}}, "train_args": {"round_mode": "async"}}, "round_mode"),
        ({"device_args": {"emulate_memory_mb": [0]}}, "device_args.emulate_memory_mb"),
    ],
)
def test_bad_values_name_the_key(raw: dict, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(")):
        config_from_dict(raw)


def test_scientific_notation_strings_become_floats(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("train_args:\n  learning_rate: 1e-3\n")
    assert load_config(p).train_args.learning_rate == pytest.approx(1e-3)


def test_round_trip_and_overrides(tmp_path: Path) -> None:
    cfg = config_from_dict({"peft_args": {"lora": {"target_modules": ["qkv"]}}}, {"train_args.comm_round": 7})
    assert cfg.train_args.comm_round == 7 and cfg.peft_args.lora.target_modules == ("qkv",)
    dump_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg
    assert replace_in(cfg, **{"peft_args.method": "full"}).peft_args.method == "full"


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train_args: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_parse(path: Path) -> None:
    assert isinstance(load_config(path), RunConfig)


def test_a_saved_run_config_keeps_the_password_out_and_still_connects(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from fedpeft_edge.config import KEYSTORE_ENV, read_password, redacted_config_dict

    monkeypatch.setenv(KEYSTORE_ENV, str(tmp_path / "keystore"))
    cfg = replace_in(RunConfig(), **{"comm_args.username": "server", "comm_args.password": "s3cret"})
    (tmp_path / "run").mkdir()
    dump_config(cfg, tmp_path / "run" / "config.yaml")
    text = (tmp_path / "run" / "config.yaml").read_text()
    assert "s3cret" not in text
    assert not any("s3cret" in p.read_text() for p in (tmp_path / "run").iterdir())  # nothing in the run dir
    (secret,) = (tmp_path / "keystore").iterdir()
    assert secret.stat().st_mode & 0o777 == 0o600 and (tmp_path / "keystore").stat().st_mode & 0o777 == 0o700
    back = load_config(tmp_path / "run" / "config.yaml")
    assert back.comm_args.password is None and back.comm_args.password_file == str(secret.resolve())
    assert read_password(back.comm_args) == "s3cret" == read_password(cfg.comm_args)
    assert redacted_config_dict(cfg)["comm_args"]["password"] == "<redacted>"
    assert redacted_config_dict(RunConfig())["comm_args"]["password"] is None
    dump_config(cfg, tmp_path / "node.yaml", keep_secrets=True)
    assert "s3cret" in (tmp_path / "node.yaml").read_text()


def test_password_and_password_file_together_are_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="password_file"):
        config_from_dict({"comm_args": {"password": "a", "password_file": str(tmp_path / "p")}})
    from fedpeft_edge.config import read_password

    missing = config_from_dict({"comm_args": {"password_file": str(tmp_path / "nope")}})
    with pytest.raises(ConfigError, match="comm_args.password_file"):
        read_password(missing.comm_args)
