"""Tied input/output embeddings (SmolLM2 ties them): frozen works, trainable is refused with the fix.
The GGUF path on the real SmolLM2-135M file (slow: a 25 s conversion and a 538 MB checkpoint)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dist_dpc.models import ModelConfig, load_causal_lm
from dist_dpc.models.config import LoraSettings
from dist_dpc.privacy.clipper import PerSampleClipper, TiedWeightsError


@pytest.fixture()
def tied_dir(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=257, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                         bos_token_id=256, eos_token_id=256)
    model = LlamaForCausalLM(config)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model.save_pretrained(tmp_path / "tied")
    return tmp_path / "tied"


def test_tied_embeddings_trainable_is_refused_frozen_or_lora_is_clipped(tied_dir):
    trainable = load_causal_lm(ModelConfig(name=str(tied_dir), task="causal_lm", freeze_embeddings=False))
    with pytest.raises(TiedWeightsError, match="model.freeze_embeddings=true"):
        PerSampleClipper(trainable, 1.0)
    frozen = load_causal_lm(ModelConfig(name=str(tied_dir), task="causal_lm", freeze_embeddings=True))
    assert not frozen.lm_head.weight.requires_grad  # the tie freezes the LM head with the embeddings
    PerSampleClipper(frozen, 1.0)
    lora = load_causal_lm(ModelConfig(name=str(tied_dir), task="causal_lm", lora=LoraSettings(r=2)))
    assert all("lora_" in n for n, p in lora.named_parameters() if p.requires_grad)
    PerSampleClipper(lora, 1.0)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_smollm2_gguf_converts_once_to_a_checkpoint_that_computes_the_same_logits(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dist_dpc.models import gguf
    from dist_dpc.models.loading import load_tokenizer, resolve_name

    monkeypatch.setenv("DPC_MODEL_CACHE", str(tmp_path / "cache"))
    source = gguf.alias_file("smollm2")
    directory = resolve_name("smollm2")
    assert (tmp_path / "cache") in Path(directory).parents
    stamp = (Path(directory) / "model.safetensors").stat().st_mtime_ns
    assert resolve_name("smollm2") == directory  # cached: converted once
    assert (Path(directory) / "model.safetensors").stat().st_mtime_ns == stamp
    model = load_causal_lm(ModelConfig(name="smollm2", task="causal_lm", freeze_embeddings=True)).eval()
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    assert sum(p.numel() for p in model.parameters()) > 130e6
    reference = AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=source.name,
                                                     dtype=torch.float32).eval()
    tok = load_tokenizer(ModelConfig(name="smollm2", task="causal_lm"), log=None)
    theirs = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
    text = "Business Category: Bars\tReview Stars: 5.0\n\nGreat beer"
    ids = tok(text, return_tensors="pt")["input_ids"]
    assert ids.tolist() == theirs(text, return_tensors="pt")["input_ids"].tolist()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits)
