"""Structured pruning on saved files (compress/layer_files.py) against the in-memory reference
(pruning.layer_importance / drop_layers): the same ranking, the same kept weights, the same logits,
for each layer stack the project supports, from single-file and sharded checkpoints."""

from __future__ import annotations

import json

import pytest
import torch

from dist_dpc.compress.distill import transformer_layers
from dist_dpc.compress.layer_files import choose_layers, layer_importance_on_disk, saved_depth, write_kept_layers
from dist_dpc.compress.pruning import drop_layers, layer_importance
from dist_dpc.models import ModelConfig, load_causal_lm, load_sequence_classifier, load_tokenizer


def _model(name):
    if name == "tiny-bert":
        return load_sequence_classifier(ModelConfig(name=name), 2, None, seed=0)
    cfg = ModelConfig(name=name, task="causal_lm")
    return load_causal_lm(cfg, load_tokenizer(cfg, log=None), seed=0)


def _scaled(model, scales):
    layers, _ = transformer_layers(model)
    with torch.no_grad():
        for layer, scale in zip(layers, scales):
            for p in layer.parameters():
                p.mul_(scale)
    return model


@pytest.mark.parametrize("name", ["tiny-bert", "tiny-gpt2", "tiny-llama"])
@pytest.mark.parametrize("shard", [None, "20KB"])
def test_cut_on_disk_equals_the_in_memory_cut(tmp_path, name, shard):
    model = _model(name).eval()
    depth = len(transformer_layers(model)[0])
    model = _scaled(model, [1.0 + 0.7 * ((3 * i) % depth) for i in range(depth)])
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(tmp_path / "src", **kwargs)
    if shard:
        assert (tmp_path / "src" / "model.safetensors.index.json").is_file()
    scores = layer_importance_on_disk(tmp_path / "src")
    assert scores == pytest.approx(layer_importance(model), rel=1e-6)
    assert saved_depth(tmp_path / "src") == depth == len(scores)
    keep_n = max(1, depth // 2)
    small, keep = drop_layers(model, keep_n)
    assert choose_layers(scores, keep_n) == keep
    write_kept_layers(tmp_path / "src", tmp_path / "cut", keep)
    config = json.loads((tmp_path / "cut" / "config.json").read_text())
    assert config.get("num_hidden_layers", config.get("n_layer")) == keep_n
    loaded = type(model).from_pretrained(tmp_path / "cut").eval()
    want = small.state_dict()
    got = loaded.state_dict()
    assert set(got) == set(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    ids = torch.randint(3, 50, (2, 6))
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=ids).logits, small(input_ids=ids).logits, atol=1e-6)


def test_choose_layers_keeps_the_last_and_breaks_ties_by_position():
    assert choose_layers([1.0, 2.0, 2.0, 0.5], 2) == [1, 3]
    assert choose_layers([1.0, 2.0, 2.0, 0.5], 2, keep_last=False) == [1, 2]
    with pytest.raises(ValueError, match="prune.target_layers=5"):
        choose_layers([1.0, 2.0], 5)


def test_a_directory_without_weights_or_layers_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        layer_importance_on_disk(tmp_path)
