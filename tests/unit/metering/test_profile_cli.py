"""`fedpeft-edge profile`: --config, the link rates and latency it assumes, per-run totals, CSV/JSON, and a bad
--link refused before any table."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
import yaml

from fedpeft_edge.cli import main as fedpeft_edge

TINY = {"model_args": {"model": "vit_tiny_patch16_224", "num_classes": 10, "weights": "none",
                       "model_kwargs": {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2,
                                        "num_heads": 2}},
        "train_args": {"client_num_in_total": 3, "client_num_per_round": 3, "comm_round": 4},
        "comm_args": {"encoding": "fp16"}}


def test_a_bad_link_is_refused_before_any_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert fedpeft_edge(["profile", "--model", "resnet18", "--link", "lte,warp9"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "link 'warp9' is not understood" in err


@pytest.mark.slow  # measures every method twice on a tiny ViT
def test_profile_of_a_config_as_json_and_csv(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(TINY))
    assert fedpeft_edge(["profile", "--config", str(cfg), "--link", "10mbit@100ms", "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["devices"] == 3 and data["rounds"] == 4  # from the config's train_args
    assert data["links"] == [{"name": "10mbit@100ms", "down_bps": 1e7, "up_bps": 1e7, "rtt_s": pytest.approx(0.1)}]
    rows = {r["method"]: r for r in data["rows"]}
    head = rows["head"]
    assert head["encoding"] == "fp16" and head["round_bytes"] == 2 * 3 * head["update_bytes"]
    assert head["run_bytes"] == 4 * head["round_bytes"]
    assert head["round_s@10mbit@100ms"] > 0.2  # latency counts: two round trips of 100 ms
    assert head["run_s@10mbit@100ms"] == pytest.approx(4 * head["round_s@10mbit@100ms"], abs=0.01)

    assert fedpeft_edge(["profile", "--config", str(cfg), "--link", "lte", "--format", "csv", "--rounds", "10"]) == 0
    table = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert {r["method"] for r in table} >= {"full", "head", "lora"} and "run_s@lte" in table[0]


def test_the_text_table_says_which_links_it_assumes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(TINY))
    assert fedpeft_edge(["profile", "--config", str(cfg), "--link", "lte"]) == 0
    out = capsys.readouterr().out
    assert "links assumed (per device, no contention): lte: 30 Mbit/s down, 10 Mbit/s up, 50 ms round trip" in out
    assert "run MB (4 r)" in out and "vit_tiny_patch16_224, 10 classes" in out
