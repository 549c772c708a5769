"""Text on the device: fortunes by category, text folders, JSONL, packed blocks, per-category evaluation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_text import tiny_lm_args, write_fortunes

from fedpeft_edge.backbone import build_backbone
from fedpeft_edge.config import DataArgs, PeftArgs
from fedpeft_edge.data import build_client_data, build_server_test_loader, load_source
from fedpeft_edge.errors import DataError
from fedpeft_edge.llm.data import category_loaders, packed_rows
from fedpeft_edge.llm.spec import TextSpec
from fedpeft_edge.llm.tokenizer import ByteTokenizer
from fedpeft_edge.peft import build_method
from fedpeft_edge.server.app import ModelEvaluator

SPEC = TextSpec(tokenizer=ByteTokenizer(), task="causal_lm", vocab_size=258)


def test_packed_blocks_hold_every_token_once_with_next_token_targets() -> None:
    rows = packed_rows(["abc", "defgh"], ByteTokenizer(), seq_len=4)
    ids = list(b"abc") + [256] + list(b"defgh") + [256]  # 10 ids -> 9 transitions -> 3 blocks of 4
    assert rows.inputs.shape == (3, 4)
    assert rows.inputs[0].tolist() == ids[0:4] and rows.targets[0].tolist() == ids[1:5]
    assert rows.inputs[2, :1].tolist() == ids[8:9] and rows.targets[2].tolist() == [ids[9], -100, -100, -100]
    assert rows.inputs[2, 1:].tolist() == [257] * 3


def test_fortunes_are_read_by_category_and_split_dirichlet_across_devices(tmp_path: Path) -> None:
    root = write_fortunes(tmp_path / "fortunes")
    args = DataArgs(dataset="fortunes", data_cache_dir=str(root), partition_method="dirichlet",
                    partition_alpha=0.1, min_samples_per_client=3, max_seq_len=16, batch_size=4)
    src = load_source(args)
    assert src.class_names == ("computers", "food", "science") and len(src.train) + len(src.test) == 90
    assert src.train.texts is not None and src.train.texts[0].startswith(src.class_names[src.train.labels[0]])
    hists = []
    for i in range(3):
        data = build_client_data(args, SPEC, 3, 0, i, source=src)
        x, y = next(iter(data.train_loader))
        assert x.shape == (4, 16) and x.dtype == torch.long
        assert torch.equal(x[:, 1:], y[:, :-1])  # packed: targets are the inputs shifted by one
        hists.append(np.bincount(data.train_labels, minlength=3))
    assert max(h.max() / h.sum() for h in hists) > 0.8  # alpha 0.1: a device is mostly one category


def test_fortune_categories_are_checked(tmp_path: Path) -> None:
    root = write_fortunes(tmp_path / "f")
    with pytest.raises(DataError, match="'nope'.*choose from"):
        load_source(DataArgs(dataset="fortunes", data_cache_dir=str(root), text_categories=("food", "nope")))
    src = load_source(DataArgs(dataset="fortunes", data_cache_dir=str(root), text_categories=("food",)))
    assert src.class_names == ("food",)


def test_jsonl_prompt_response_pairs_and_text_folders(tmp_path: Path) -> None:
    rows = [{"prompt": f"Q{i}?", "response": f"A{i}.", "category": "qa"} for i in range(10)] + \
           [{"text": f"note {i}"} for i in range(10)]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    src = load_source(DataArgs(dataset="jsonl", data_cache_dir=str(tmp_path / "d.jsonl")))
    texts = set((src.train.texts or ()) + (src.test.texts or ()))
    assert "Q3?\nA3." in texts and "note 4" in texts and src.class_names == ("qa", "text")
    for cat in ("a", "b"):
        (tmp_path / "tf" / cat).mkdir(parents=True)
        for i in range(5):
            (tmp_path / "tf" / cat / f"{i}.txt").write_text(f"{cat} doc {i}")
    src = load_source(DataArgs(dataset="textfolder", data_cache_dir=str(tmp_path / "tf")))
    assert src.class_names == ("a", "b") and len(src.train) + len(src.test) == 10
    (tmp_path / "bad.jsonl").write_text('{"title": "x"}\n')
    with pytest.raises(DataError, match="bad.jsonl:1"):
        load_source(DataArgs(dataset="jsonl", data_cache_dir=str(tmp_path / "bad.jsonl")))


def test_image_backbones_refuse_text_and_text_backbones_refuse_images(tmp_path: Path) -> None:
    root = write_fortunes(tmp_path / "f")
    from fedpeft_edge.backbone import InputSpec

    image = InputSpec((3, 32, 32), (0.5,) * 3, (0.5,) * 3)
    with pytest.raises(DataError, match="holds text"):
        build_server_test_loader(DataArgs(dataset="fortunes", data_cache_dir=str(root)), image, 0)
    with pytest.raises(DataError, match="holds images"):
        build_server_test_loader(DataArgs(dataset="digits"), SPEC, 0)


def test_the_server_reports_perplexity_per_category(tmp_path: Path) -> None:
    root = write_fortunes(tmp_path / "f")
    args = DataArgs(dataset="fortunes", data_cache_dir=str(root), max_seq_len=24, batch_size=8)
    src = load_source(args)
    torch.manual_seed(0)
    method = build_method(PeftArgs(method="lora"))
    model = method.apply(build_backbone(tiny_lm_args()).model)
    loader = build_server_test_loader(args, SPEC, 0, src)
    groups = category_loaders(loader, src.class_names)
    assert set(groups) == set(src.class_names)
    ev = ModelEvaluator(method, model, loader, torch.device("cpu"), groups, language_model=True)
    res = ev.evaluate(method.get_state(model))
    assert res is not None and res["perplexity"] == pytest.approx(math.exp(res["loss"]))
    assert sum(c["samples"] for c in res["per_category"].values()) == res["samples"]
    whole = ModelEvaluator(method, model, loader, torch.device("cpu")).evaluate(method.get_state(model))
    assert whole is not None and whole["loss"] == pytest.approx(res["loss"], rel=1e-5)
    assert "perplexity" not in whole
