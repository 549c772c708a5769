"""The paper's DP configurations (epsilon 5, delta 1e-3, clip 1.0) load in the full schema and plan sanely."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedpeft_edge.config import load_config
from fedpeft_edge.privacy import plan_dp

CONFIGS = Path(__file__).resolve().parents[3] / "configs"
PAPER_LR = {"full": 1e-3, "head": 5e-3, "bias": 1e-2, "adapter": 5e-3, "prompt": 1e-2, "lora": 5e-3}


@pytest.mark.parametrize("method", sorted(PAPER_LR))
def test_paper_dp_config_loads_with_the_paper_setting(method: str) -> None:
    cfg = load_config(CONFIGS / f"paper_dp_{method}.yaml")
    dp, t, d, m = cfg.dp_args, cfg.train_args, cfg.data_args, cfg.model_args
    assert (dp.enabled, dp.target_epsilon, dp.target_delta, dp.max_grad_norm) == (True, 5.0, 1e-3, 1.0)
    assert dp.noise_multiplier is None and dp.poisson_sampling and dp.accountant == "rdp"
    assert cfg.peft_args.method == method and t.learning_rate == PAPER_LR[method]
    assert (m.model, m.weights, m.num_classes) == ("vit_base_patch16_224", "file", 100)
    assert (d.dataset, d.partition_method, d.partition_alpha) == ("cifar100", "dirichlet", 0.1)
    assert d.batch_size == 64
    assert (t.client_num_in_total, t.client_num_per_round, t.comm_round, t.epochs) == (64, 8, 50, 10)
    assert (t.client_optimizer, t.momentum, t.nesterov, t.weight_decay) == ("sgd", 0.9, True, 1e-4)
    assert cfg.device_args.state_dir


def test_paper_dp_plan_for_an_average_device_fits_epsilon_5() -> None:
    cfg = load_config(CONFIGS / "paper_dp_lora.yaml")
    per_device = 50_000 // cfg.train_args.client_num_in_total
    plan = plan_dp(cfg.dp_args, sample_size=per_device, batch_size=cfg.data_args.batch_size,
                   epochs_per_round=cfg.train_args.epochs, planned_rounds=cfg.train_args.comm_round)
    assert plan.planned_steps == 50 * 10 * int(per_device / 64)
    assert 0.5 < plan.noise_multiplier < 10.0 and 4.9 < plan.planned_epsilon <= 5.0
