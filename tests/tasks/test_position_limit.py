"""data.max_length against the model's positions: the limit each architecture family really has."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertModel, GPT2Config, LlamaConfig, RobertaConfig, RobertaModel

from dist_dpc.models.loading import check_max_length, position_limit


def test_position_limits_of_each_family():
    assert position_limit(BertConfig(max_position_embeddings=64)) == 64
    assert position_limit(GPT2Config(n_positions=96)) == 96
    assert position_limit(LlamaConfig(max_position_embeddings=256)) == 256
    # RoBERTa's positions start after its padding index: 514 embeddings read 512 tokens.
    assert position_limit(RobertaConfig(max_position_embeddings=514, pad_token_id=1)) == 512


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_the_limit_is_what_the_model_reads_and_one_more_token_fails(family):
    # Independent of position_limit's arithmetic: the model itself runs at the limit and fails past it.
    if family == "bert":
        config = BertConfig(vocab_size=30, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=8, max_position_embeddings=20)
        model = BertModel(config)
    else:
        config = RobertaConfig(vocab_size=30, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=8, max_position_embeddings=20, pad_token_id=1)
        model = RobertaModel(config)
    limit = position_limit(config)
    model(input_ids=torch.full((1, limit), 5))
    with pytest.raises((IndexError, RuntimeError)):
        model(input_ids=torch.full((1, limit + 1), 5))
    check_max_length(config, limit, "the model")
    with pytest.raises(ValueError, match=f"data.max_length={limit + 1} .* at most {limit}"):
        check_max_length(config, limit + 1, "the model")
