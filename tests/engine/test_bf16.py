"""bf16: clipping runs on bf16 activations, noise lands in DeepSpeed's fp32 master partitions."""

from __future__ import annotations

import pytest
import torch
from deepspeed.utils import safe_get_full_fp32_param

from dist_dpc.engine import DPEngine, build_ds_config, init_distributed
from dist_dpc.engine.losses import sequence_classification_loss
from dist_dpc.models import ModelConfig, load_sequence_classifier
from dist_dpc.privacy import PrivacyConfig
from dist_dpc.privacy.randomness import SecretKey


@pytest.mark.parametrize("stage", [2, 3])
def test_bf16_noise_in_fp32_masters(stage):
    world = init_distributed()
    model = load_sequence_classifier(ModelConfig(name="tiny-bert", dropout=0.0), num_labels=2)
    ds = build_ds_config({"zero_optimization": {"stage3_param_persistence_threshold": 0},
                          "optimizer": {"type": "SGD", "params": {"lr": 1.0}}},
                         micro_batch_size=4, world_size=1, zero_stage=stage, lr=1.0, weight_decay=0.0,
                         optimizer="sgd", bf16=True)
    sigma, clip, expected_batch = 1.0, 1.0, 4
    engine = DPEngine(model, ds, PrivacyConfig(target_epsilon=None, noise_multiplier=sigma, max_grad_norm=clip, delta=1e-4),
                      dataset_size=1000, expected_batch_size=expected_batch, planned_steps=2,
                      loss_fn=sequence_classification_loss, world=world, key=SecretKey.generate())
    params = list(engine.module.parameters())
    assert params[0].dtype == torch.bfloat16
    before = [safe_get_full_fp32_param(p).clone() for p in params]
    real = {"input_ids": torch.randint(1, 100, (4, 6)), "attention_mask": torch.ones(4, 6, dtype=torch.long),
            "labels": torch.tensor([0, 1, 0, 1]), "sample_mask": torch.ones(4)}
    stats = engine.train_step([real], 4)
    assert torch.isfinite(torch.tensor(stats.loss)) and stats.grad_norm_quantiles["p50"] > 0
    # A batch of padding rows only: the update of the fp32 masters is the noise alone.
    padding = dict(real, sample_mask=torch.zeros(4))
    middle = [safe_get_full_fp32_param(p).clone() for p in params]
    engine.train_step([padding], 0)
    update = torch.cat([(safe_get_full_fp32_param(p) - m).flatten() for p, m in zip(params, middle)])
    assert abs(float(update.std()) / (sigma * clip / expected_batch) - 1) < 0.03
    assert int((update == 0).sum()) == 0
    assert any(not torch.equal(a, b) for a, b in zip(before, middle))


def test_bf16_warns_once_what_the_analysis_leaves_out(monkeypatch):
    """The bf16 rounding of each micro-batch's clipped sum is outside the analysis (docs/privacy.md,
    Numerics): said once per process at engine construction, only under DP with bf16."""
    from torch import nn

    from dist_dpc.engine import dp_engine

    monkeypatch.setattr(dp_engine, "_BF16_WARNED", False)
    model = nn.Linear(2, 2)
    dp_engine._warn_bf16_sum_rounding(PrivacyConfig(enabled=False), {"bf16": {"enabled": True}}, model)
    dp_engine._warn_bf16_sum_rounding(PrivacyConfig(), {"bf16": {"enabled": False}}, model)
    assert not dp_engine._BF16_WARNED
    with pytest.warns(UserWarning, match=r"bf16 rounding of each micro-batch's clipped sum .* outside the privacy analysis"):
        dp_engine._warn_bf16_sum_rounding(PrivacyConfig(), {"bf16": {"enabled": True}}, model)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dp_engine._warn_bf16_sum_rounding(PrivacyConfig(), {}, model.to(torch.bfloat16))  # once only
