"""Config overlays: `--config base.yaml --config node.yaml` merges key by key, the later file winning, and an
unknown key in any file is still an error (a provisioned per-device snippet is used as it is)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fedpeft_edge.config import load_config
from fedpeft_edge.errors import ConfigError


def _write(path: Path, data: dict) -> Path:  # type: ignore[type-arg]
    path.write_text(yaml.safe_dump(data))
    return path


def test_a_node_overlay_wins_key_by_key_and_keeps_the_rest(tmp_path: Path) -> None:
    base = _write(tmp_path / "base.yaml", {
        "common_args": {"run_id": "fleet"},
        "train_args": {"comm_round": 7, "learning_rate": 0.02},
        "comm_args": {"broker_host": "10.0.0.2", "broker_port": 1883, "username": "server"},
        "model_args": {"model_kwargs": {"img_size": 32, "patch_size": 8}},
    })
    node = _write(tmp_path / "node.yaml", {
        "comm_args": {"username": "dev-3", "password_file": "/etc/fedpeft/dev-3.password"},
        "model_args": {"model_kwargs": {"patch_size": 4}},
    })
    cfg = load_config([base, node])
    assert cfg.comm_args.username == "dev-3" and cfg.comm_args.password_file == "/etc/fedpeft/dev-3.password"
    assert cfg.comm_args.broker_host == "10.0.0.2" and cfg.train_args.comm_round == 7  # from the base
    assert dict(cfg.model_args.model_kwargs) == {"img_size": 32, "patch_size": 4}  # merged, not replaced
    assert load_config([node, base]).comm_args.username == "server"  # order matters: later wins
    assert load_config(str(base)) == load_config([base])


def test_an_unknown_key_in_an_overlay_is_an_error_naming_the_files(tmp_path: Path) -> None:
    base = _write(tmp_path / "base.yaml", {"train_args": {"comm_round": 3}})
    node = _write(tmp_path / "node.yaml", {"comm_args": {"pasword": "x"}})
    with pytest.raises(ConfigError, match=r"base.yaml \+ .*node.yaml.*unknown key\(s\) 'pasword'"):
        load_config([base, node])


def test_the_programs_take_repeated_config_flags(tmp_path: Path) -> None:
    from device_agents.doctor import build_parser as doctor_parser
    from device_agents.main import build_parser as agent_parser
    from server_app.main import build_parser as server_parser

    flags = ["--config", "base.yaml", "--config", "node.yaml"]
    assert server_parser().parse_args(flags).config == ["base.yaml", "node.yaml"]
    assert agent_parser().parse_args(flags).config == ["base.yaml", "node.yaml"]
    assert doctor_parser().parse_args(flags).config == ["base.yaml", "node.yaml"]
    from fedpeft_edge.cli import build_parser as umbrella

    argv = ["simulate", *flags]
    assert umbrella(argv).parse_args(argv).config == ["base.yaml", "node.yaml"]
