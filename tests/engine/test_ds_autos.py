"""DeepSpeed settings derived for the user. HF DeepSpeed templates' "auto" bucket sizes: filled from the model's width by the rule transformers'
Trainer applies (checked against transformers' own HfTrainerDeepSpeedConfig), reaching DeepSpeed's
engine, and a clear error where the model has no width to size them from."""

from __future__ import annotations

import copy

import pytest
import torch

from dist_dpc.engine.ds_config import fill_width_autos, model_width

AUTOS = {"reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
         "stage3_param_persistence_threshold": "auto"}


def tiny_bert(hidden: int = 48):
    from transformers import BertConfig, BertForSequenceClassification

    return BertForSequenceClassification(BertConfig(vocab_size=100, hidden_size=hidden, num_hidden_layers=1,
                                                    num_attention_heads=4, intermediate_size=2 * hidden))


def hf_filled(ds: dict, model, tmp_path) -> dict:
    """What transformers' Trainer makes of the same JSON (its trainer_config_finalize)."""
    from transformers import TrainingArguments
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig, unset_hf_deepspeed_config

    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    hf = HfTrainerDeepSpeedConfig(copy.deepcopy(ds))
    try:
        hf.trainer_config_finalize(args, model, num_training_steps=10)
        return hf.config
    finally:
        unset_hf_deepspeed_config()


@pytest.mark.parametrize("stage", [2, 3])
def test_widths_fill_autos_as_the_hf_trainer_does(stage, tmp_path):
    model = tiny_bert(48)
    ds = {"zero_optimization": {"stage": stage, **AUTOS, "overlap_comm": True}}
    ours = fill_width_autos(ds, model_width(model))
    theirs = hf_filled(ds, model, tmp_path)
    for key in AUTOS:
        if theirs["zero_optimization"][key] == "auto":  # HF leaves the stage-3 keys at ZeRO 2: DeepSpeed drops them
            assert key not in ours["zero_optimization"], key
        else:
            assert ours["zero_optimization"][key] == theirs["zero_optimization"][key], key
    assert ours["zero_optimization"]["reduce_bucket_size"] == 48 * 48
    assert ds["zero_optimization"]["reduce_bucket_size"] == "auto"  # the caller's dict is left as it was
    # Numbers the user wrote are kept; a config without "auto" comes back as it is.
    fixed = {"zero_optimization": {"stage": stage, "reduce_bucket_size": 12345}}
    assert fill_width_autos(fixed, 48) == fixed


def test_a_model_without_width_gets_the_field_and_the_fix():
    ds = {"zero_optimization": {"stage": 3, **AUTOS}}
    assert model_width(torch.nn.Linear(4, 2)) is None
    with pytest.raises(ValueError, match=r"zero_optimization.reduce_bucket_size=\"auto\" .* no config.hidden_size: "
                                         r"set zero_optimization.reduce_bucket_size, .* to numbers"):
        fill_width_autos(ds, None)
    # "auto" entries that do not depend on the width need none: they go (DeepSpeed's defaults).
    assert fill_width_autos({"zero_optimization": {"stage": 2, "overlap_comm": "auto"}}, None) == \
        {"zero_optimization": {"stage": 2}}


def test_the_dp_engine_hands_the_filled_sizes_to_deepspeed():
    from dist_dpc.engine import DPEngine, build_ds_config, init_distributed
    from dist_dpc.engine.losses import sequence_classification_loss
    from dist_dpc.privacy import PrivacyConfig
    from dist_dpc.privacy.randomness import SecretKey

    world = init_distributed()
    model = tiny_bert(48)
    ds = build_ds_config({"zero_optimization": {"stage": 3, **AUTOS}}, micro_batch_size=4, world_size=1,
                         zero_stage=3, lr=1e-3, weight_decay=0.0, optimizer="adamw", bf16=False)
    engine = DPEngine(model, ds, PrivacyConfig(target_epsilon=None, noise_multiplier=1.0), dataset_size=1000,
                      expected_batch_size=10, planned_steps=5, loss_fn=sequence_classification_loss, world=world,
                      key=SecretKey.generate())
    assert engine.ds.zero_reduce_bucket_size() == 48 * 48
    assert engine.ds.zero_prefetch_bucket_size() == int(0.9 * 48 * 48)
    assert engine.ds.zero_param_persistence_threshold() == 480


def test_a_partitioned_teacher_follows_the_training_configs_gather_settings():
    """DPKD's frozen teacher at ZeRO 3 keeps as many gathered parameters live as the user's JSON allows
    the student (DeepSpeed's defaults would keep up to 1e9 elements gathered); "auto" is sized from the
    teacher's own width."""
    from dist_dpc.engine import init_distributed
    from dist_dpc.engine.frozen import partition_frozen

    init_distributed()
    zero = {"stage": 3, "stage3_max_live_parameters": 1000, "stage3_max_reuse_distance": 0,
            "stage3_prefetch_bucket_size": "auto", "reduce_bucket_size": 77}
    teacher = partition_frozen(tiny_bert(32), micro_batch_size=2, bf16=False, zero=zero)
    engine = teacher.ds_inference[0]
    assert engine.zero_max_live_parameters() == 1000
    assert engine.zero_max_reuse_distance() == 0
    assert engine.zero_prefetch_bucket_size() == int(0.9 * 32 * 32)
    assert engine.zero_reduce_bucket_size() != 77  # only the gather settings are inherited
    default = partition_frozen(tiny_bert(32), micro_batch_size=2, bf16=False).ds_inference[0]
    assert default.zero_max_live_parameters() == 1_000_000_000


def test_zero_init_reads_the_same_filled_sizes_as_the_engine(tmp_path):
    """At ZeRO 3 the phases build models inside zero.Init, which marks the parameters that stay
    gathered by the persistence threshold it reads: the one the engine will use, from the saved
    config; a name without a readable config leaves the JSON as it is (the load then says why)."""
    from dist_dpc.pipeline.trainer import config_for_loading

    tiny_bert(48).save_pretrained(tmp_path / "m")
    ds = {"zero_optimization": {"stage": 3, **AUTOS}}
    assert config_for_loading(ds, str(tmp_path / "m")) == fill_width_autos(ds, 48)
    assert config_for_loading(ds, str(tmp_path / "missing")) == ds
    assert config_for_loading(ds, None) == ds
