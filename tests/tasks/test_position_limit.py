"""data.max_length against the model's positions: the limit each architecture family really has,
and the longest batch the collators build from examples truncated to data.max_length."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertModel, GPT2Config, GPT2Model, LlamaConfig, RobertaConfig, RobertaModel

from dist_dpc.data import PAD_MULTIPLE, collate
from dist_dpc.models.loading import check_max_length, position_limit


def test_position_limits_of_each_family():
    assert position_limit(BertConfig(max_position_embeddings=64)) == 64
    assert position_limit(GPT2Config(n_positions=96)) == 96
    assert position_limit(LlamaConfig(max_position_embeddings=256)) == 256
    # RoBERTa's positions start after its padding index: 514 embeddings read 512 tokens.
    assert position_limit(RobertaConfig(max_position_embeddings=514, pad_token_id=1)) == 512


def _model(family: str, positions: int):
    small = dict(vocab_size=30, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8)
    if family == "bert":
        config = BertConfig(**small, max_position_embeddings=positions)
        return config, BertModel(config).eval()
    if family == "roberta":
        config = RobertaConfig(**small, max_position_embeddings=positions, pad_token_id=1)
        return config, RobertaModel(config).eval()
    config = GPT2Config(vocab_size=30, n_embd=8, n_layer=1, n_head=2, n_positions=positions)
    return config, GPT2Model(config).eval()


@pytest.mark.parametrize("family", ["bert", "roberta", "gpt2"])
def test_the_limit_is_what_the_model_reads_and_one_more_token_fails(family):
    # Independent of position_limit's arithmetic: the model itself runs at the limit and fails past it.
    config, model = _model(family, 24)
    limit = position_limit(config)
    with torch.no_grad():
        model(input_ids=torch.full((1, limit), 5))
        with pytest.raises((IndexError, RuntimeError)):
            model(input_ids=torch.full((1, limit + 1), 5))
    check_max_length(config, limit, "the model")
    with pytest.raises(ValueError, match=f"data.max_length={limit + 1} .* at most {limit}"):
        check_max_length(config, limit + 1, "the model")


def test_a_limit_off_the_padding_multiple_counts_the_padded_batch():
    """A batch is padded to its longest example rounded up to PAD_MULTIPLE: with 20 positions a
    data.max_length of 20 passes the plain check, but one example of 17-20 tokens makes a batch of
    24 that the model cannot read. Refused, with the largest data.max_length that always fits."""
    config, model = _model("bert", 20)
    assert PAD_MULTIPLE == 8
    long_batch = collate([{"input_ids": [5] * 18, "token_type_ids": [0] * 18, "labels": 0}], 0)
    assert long_batch["input_ids"].shape[1] == 24
    with torch.no_grad(), pytest.raises((IndexError, RuntimeError)):
        model(input_ids=long_batch["input_ids"], attention_mask=long_batch["attention_mask"])
    with pytest.raises(ValueError, match=r"data.max_length=20 \(batches are padded up to a multiple of 8: 24 tokens\).*at most 16"):
        check_max_length(config, 20, "the model", pad_multiple=PAD_MULTIPLE)
    check_max_length(config, 16, "the model", pad_multiple=PAD_MULTIPLE)
    fits = collate([{"input_ids": [5] * 16, "token_type_ids": [0] * 16, "labels": 0}], 0)
    with torch.no_grad():
        model(input_ids=fits["input_ids"], attention_mask=fits["attention_mask"])
