"""Everything that would make the DP guarantee silently false is refused before training starts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dist_dpc.engine import DPEngine, PrivacyBudgetError, UnsafeDeepSpeedConfig, build_ds_config, init_distributed
from dist_dpc.engine.losses import sequence_classification_loss
from dist_dpc.models import ModelConfig, load_sequence_classifier
from dist_dpc.privacy import PrivacyConfig, TiedWeightsError, UnsupportedLayerError
from dist_dpc.privacy.randomness import SecretKey


@pytest.fixture(scope="module")
def world():
    return init_distributed()


def ds(**kw):
    base = dict(micro_batch_size=4, world_size=1, zero_stage=0, lr=1e-3, weight_decay=0.0, optimizer="adamw", bf16=False)
    base.update(kw)
    return build_ds_config(base.pop("user", None), **base)


def engine(world, model=None, privacy=None, **kw):
    model = model or load_sequence_classifier(ModelConfig(name="tiny-bert"), num_labels=2)
    privacy = privacy or PrivacyConfig(target_epsilon=None, noise_multiplier=1.0)
    args = dict(dataset_size=1000, expected_batch_size=10, planned_steps=5, loss_fn=sequence_classification_loss,
                world=world, key=SecretKey.generate())
    args.update(kw)
    return DPEngine(model, ds(), privacy, **args)


@pytest.mark.parametrize("user, fix", [
    ({"gradient_clipping": 1.0}, "privacy.max_grad_norm"),
    ({"fp16": {"enabled": True}}, "use bf16 or fp32"),
    ({"prescale_gradients": True}, "set it to false"),
    ({"gradient_predivide_factor": 2.0}, "remove it"),
    ({"amp": {"enabled": True}}, "use bf16 or fp32"),
    ({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu", "ratio": 0.3}}},
     r"zero_optimization.offload_optimizer.ratio=0.3 \(below 1, ZeRO-3 steps part of the parameters with a backup"),
    ({"torch_autocast": {"enabled": True, "dtype": "bfloat16"}}, r"torch_autocast \(DeepSpeed's autocast path"),
    ({"zero_optimization": {"stage": 3, "zenflow": {"topk_ratio": 0.1}}}, "zero_optimization.zenflow"),
    # Unknown keys, at the top and nested, are refused with the list of what is allowed there.
    ({"sparse_gradients": True},
     r"sparse_gradients \(not a DeepSpeed setting .* Allowed: train_batch_size, .*zero_optimization"),
    ({"zero_optimization": {"stage": 2, "round_robin_gradients": True}},
     r"zero_optimization.round_robin_gradients .* Allowed in zero_optimization: stage, .*offload_optimizer"),
    ({"zero_optimization": {"offload_optimizer": {"device": "nvme", "nvme_path": "/x"}}},
     r"offload_optimizer.device='nvme' \(tested values: cpu, none\).*offload_optimizer.nvme_path"),
    ({"optimizer": {"type": "OneBitAdam", "params": {"lr": 1e-3}}}, r"optimizer.type='OneBitAdam' \(tested values"),
    ({"bf16": {"enabled": True, "immediate_grad_update": True}}, "bf16.immediate_grad_update"),
])
def test_unsafe_deepspeed_configs_refused(user, fix):
    with pytest.raises(UnsafeDeepSpeedConfig, match=fix):
        ds(user=user)


def test_everything_the_tests_and_templates_use_is_allowed():
    user = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0, "overlap_comm": True,
                                  "offload_optimizer": {"device": "cpu", "pin_memory": True, "ratio": 1.0}},
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
            "comms_logger": {"enabled": True, "prof_all": True, "verbose": False},
            "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 5}}, "wall_clock_breakdown": False}
    assert ds(user=user, optimizer="sgd")["zero_optimization"]["stage"] == 0  # zero_stage=0 overrides
    assert ds(user={"optimizer": {"type": "SGD", "params": {"lr": 1.0}}})["zero_allow_untested_optimizer"] is True
    # Without DP nothing but the batch keys is checked.
    assert build_ds_config({"torch_autocast": {"enabled": True}}, micro_batch_size=4, world_size=1, zero_stage=0,
                           lr=1e-3, weight_decay=0.0, optimizer="adamw", bf16=False, dp_enabled=False)


def test_deepspeed_batch_keys_are_derived_not_read():
    with pytest.raises(ValueError, match="train.micro_batch_size"):
        ds(user={"train_micro_batch_size_per_gpu": 99})
    assert ds(user={"train_micro_batch_size_per_gpu": "auto"})["train_micro_batch_size_per_gpu"] == 4
    # Without DP the same clipping setting is the user's business.
    assert build_ds_config({"gradient_clipping": 1.0}, micro_batch_size=4, world_size=1, zero_stage=0, lr=1e-3,
                           weight_decay=0.0, optimizer="adamw", bf16=False, dp_enabled=False)["gradient_clipping"] == 1.0


def test_unsupported_trainable_layer_refused_before_deepspeed(world):
    class WithConv(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(4, 4, 1)

    with pytest.raises(UnsupportedLayerError, match=r"conv \(torch.nn.modules.conv.Conv1d\)"):
        engine(world, model=WithConv())


def test_tied_weights_refused(world):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=16))
    with pytest.raises(TiedWeightsError, match="tie_word_embeddings=False"):
        engine(world, model=model)


def test_delta_at_or_above_one_over_n_refused(world):
    with pytest.raises(ValueError, match=r"must be < 1/N"):
        engine(world, privacy=PrivacyConfig(target_epsilon=3.0, delta=1e-3), dataset_size=1000)


def test_unreachable_epsilon_refused(world):
    with pytest.raises(ValueError, match="unreachable"):
        engine(world, privacy=PrivacyConfig(target_epsilon=1e-4), planned_steps=2000, expected_batch_size=100)


def test_fixed_sigma_over_budget_refused(world):
    with pytest.raises(PrivacyBudgetError, match="raise the noise multiplier"):
        engine(world, privacy=PrivacyConfig(target_epsilon=0.5, noise_multiplier=0.6), planned_steps=500)


def test_step_beyond_budget_refused(world):
    eng = engine(world, planned_steps=1)
    batch = {"input_ids": torch.randint(1, 100, (4, 6)), "attention_mask": torch.ones(4, 6, dtype=torch.long),
             "labels": torch.zeros(4, dtype=torch.long), "sample_mask": torch.ones(4)}
    eng.train_step([batch], logical_batch_size=4)
    with pytest.raises(PrivacyBudgetError, match="exceed the privacy budget"):
        eng.train_step([batch], logical_batch_size=4)
    assert eng.accountant.steps == 1


def test_config_level_checks():
    with pytest.raises(ValueError, match="privacy.max_grad_norm"):
        PrivacyConfig(max_grad_norm=0)
    with pytest.raises(ValueError, match="privacy.target_epsilon"):
        PrivacyConfig(target_epsilon=None, noise_multiplier=None)


@pytest.mark.parametrize("template", sorted(p.name for p in (__import__("pathlib").Path(__file__).resolve().parents[2] / "ds_configs").glob("*.json")))
def test_shipped_deepspeed_templates_pass_the_checks(template):
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "ds_configs" / template
    config = build_ds_config(str(path), micro_batch_size=4, world_size=2, zero_stage=None, lr=1e-3, weight_decay=0.0,
                             optimizer="adamw", bf16=False)
    assert config["zero_optimization"]["stage"] == int(template[4])
    assert config["bf16"]["enabled"] is (torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    assert config["gradient_clipping"] == 0.0
