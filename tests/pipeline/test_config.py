"""Typed config: YAML + dotted overrides, strict keys, errors naming field, value and allowed values."""

from __future__ import annotations

import subprocess
import sys

import pytest

from dist_dpc.pipeline.config import Config, load_config
from dist_dpc.utils.config_loader import ConfigError


def write(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return str(path)


def test_yaml_and_overrides(tmp_path):
    path = write(tmp_path, "train:\n  lr: 1e-4\n  batch_size: 32\nprivacy:\n  target_epsilon: 8\n")
    cfg = load_config(path, ["train.lr=3e-4", "privacy.target_epsilon=3", "privacy.clipping=flat", "model.name=tiny-bert"])
    assert isinstance(cfg, Config)
    assert (cfg.train.lr, cfg.train.batch_size, cfg.privacy.target_epsilon) == (3e-4, 32, 3.0)
    assert cfg.privacy.clipping == "flat" and cfg.model.name == "tiny-bert"
    assert load_config(None, ["privacy.delta=null", "privacy.noise_multiplier=1"]).privacy.noise_multiplier == 1.0


@pytest.mark.parametrize("override, message", [
    (["train.lrr=1e-4"], "unknown config key 'train.lrr' (did you mean 'train.lr'?)"),
    (["privcy.delta=1e-6"], "unknown config key 'privcy' (did you mean 'privacy'?)"),
    (["privacy.clipping=global"], "privacy.clipping='global' is invalid: allowed values are 'flat', 'per_layer'"),
    (["train.batch_size=abc"], "train.batch_size='abc' is invalid: expected an integer"),
    (["train.zero_stage=4"], "train.zero_stage=4 is invalid: allowed values are 0, 1, 2, 3"),
    (["privacy.max_grad_norm=-1"], "privacy.max_grad_norm=-1.0 is invalid: must be > 0"),
    (["train.lr"], "not of the form section.key=value"),
    (["head_init.probe_epochs=-1"], "head_init.probe_epochs=-1.0 is invalid: must be >= 0 (0: no probe)"),
    (["head_init.mean_noise_multiplier=0"], "head_init.mean_noise_multiplier=0.0 is invalid: must be > 0"),
    (["pipeline.budget_split={teacher:0.5, distill:0.5}"],
     "'teacher:0.5' is read as one key without a value; in a YAML mapping put a space after each colon, "
     "e.g. pipeline.budget_split={teacher: 0.5, distill:0.5}"),
])
def test_bad_values_name_field_value_and_fix(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, override)
    assert message in str(info.value)


def test_unknown_key_in_yaml(tmp_path):
    with pytest.raises(ConfigError, match="unknown config key 'data.taks'"):
        load_config(write(tmp_path, "data:\n  taks: sst2\n"))


def test_cli_misspelled_key_fails_with_its_name(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "dist_dpc.cli", "train", write(tmp_path, "train:\n  lr: 1e-4\n"),
                           "train.epoch=2"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "unknown config key 'train.epoch' (did you mean 'train.epochs'?)" in proc.stderr


def test_cli_config_prints_resolved_yaml(tmp_path):
    import yaml

    proc = subprocess.run([sys.executable, "-m", "dist_dpc.cli", "config", write(tmp_path, "train:\n  lr: 1e-4\n"),
                           "privacy.target_epsilon=2"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    data = yaml.safe_load(proc.stdout)
    assert data["train"]["lr"] == 1e-4 and data["privacy"]["target_epsilon"] == 2.0


def test_help_describes_every_option():
    from dist_dpc.utils.config_loader import describe_fields

    for command in ("train", "demo", "config"):
        out = subprocess.run([sys.executable, "-m", "dist_dpc.cli", command, "--help"], capture_output=True,
                             text=True, timeout=120).stdout
        for name, _, _, doc in describe_fields(Config):
            assert name in out, (command, name)
    top = subprocess.run([sys.executable, "-m", "dist_dpc.cli", "--help"], capture_output=True, text=True).stdout
    for command in ("train", "demo", "config"):
        assert command in top
    # Every config field carries a docstring, so --help explains it.
    undocumented = [name for name, _, _, doc in describe_fields(Config) if not doc]
    assert not undocumented, undocumented


def test_model_trainable_freezes_everything_else_and_the_engine_skips_it():
    from dist_dpc.models import ModelConfig, load_sequence_classifier
    from dist_dpc.privacy import PerSampleClipper

    model = load_sequence_classifier(ModelConfig(name="tiny-bert", trainable=["bias", "LayerNorm", "classifier"]), 2)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(("bias" in n or "LayerNorm" in n or "classifier" in n) for n in trained)
    assert "bert.encoder.layer.0.attention.self.query.weight" not in trained
    assert "classifier.weight" in trained and "bert.encoder.layer.0.attention.self.query.bias" in trained
    clipper = PerSampleClipper(model, 1.0)  # modules with only frozen parameters are not clipped layers
    owners = {n.rsplit(".", 1)[0] for n in trained}
    assert {layer.name for layer in clipper.layers} == owners
    with pytest.raises(ValueError, match="no parameter name matches"):
        load_sequence_classifier(ModelConfig(name="tiny-bert", trainable=["nothing_like_this"]), 2)
    with pytest.raises(ValueError, match="model.trainable"):
        ModelConfig(name="tiny-bert", trainable=["("])


def test_a_tree_saved_before_a_field_existed_resumes_unless_the_field_is_changed():
    """Adding a config field (with the old behaviour as its default) must not orphan existing trees."""
    from dist_dpc.pipeline.config import Config
    from dist_dpc.pipeline.run_dir import _differences
    from dist_dpc.utils.config_loader import to_dict

    new, defaults = to_dict(Config()), to_dict(Config())
    old = {section: dict(values) if isinstance(values, dict) else values for section, values in new.items()}
    del old["model"]["task"], old["data"]["eval_stride"], old["audit"]  # audit: a section added since
    assert _differences(old, new, defaults=defaults) == []
    assert _differences(old, dict(new, audit=dict(new["audit"], canaries=5)), defaults=defaults) == \
        ["audit: '<absent>' -> " + repr(dict(new["audit"], canaries=5))]
    changed = dict(new, model=dict(new["model"], task="causal_lm"))
    assert _differences(old, changed, defaults=defaults) == ["model.task: '<absent>' -> 'causal_lm'"]
    # Only the listed new fields get this treatment, and a missing key set to None is a change too.
    older = dict(old, privacy={k: v for k, v in old["privacy"].items() if k != "max_effective_noise"})
    assert _differences(older, dict(new, privacy=dict(new["privacy"], max_effective_noise=None)), defaults=defaults)
    assert _differences(old, dict(new, data=dict(new["data"], max_length=7)), defaults=defaults) == \
        ["data.max_length: 128 -> 7"]
