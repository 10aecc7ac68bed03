"""A sample that produces NaN/inf: per_layer drops it (the update stays finite and equals the update
without it); flat cannot keep it out of its ordinary real backward, so the engine's noise hook stops
the run before any parameter changes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dist_dpc.engine import DPEngine, build_ds_config, init_distributed
from dist_dpc.engine.dp_engine import NonFiniteGradientError
from dist_dpc.privacy import PrivacyConfig
from dist_dpc.privacy.randomness import SecretKey

OVERFLOW = 11  # the token whose activations overflow


class Overflowing(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.lin, self.head = nn.Embedding(12, 6), nn.Linear(6, 6), nn.Linear(6, 2)

    def forward(self, input_ids):
        h = self.embed(input_ids)
        h = h * torch.where(input_ids == OVERFLOW, float("inf"), 1.0).unsqueeze(-1)
        return self.head(torch.tanh(self.lin(h)).mean(1))


def loss(forward, batch):
    return F.cross_entropy(forward(input_ids=batch["input_ids"]), batch["labels"], reduction="none")


def make_engine(clipping):
    ds = build_ds_config({"optimizer": {"type": "SGD", "params": {"lr": 1.0}}}, micro_batch_size=4, world_size=1,
                         zero_stage=0, lr=1.0, weight_decay=0.0, optimizer="sgd", bf16=False)
    privacy = PrivacyConfig(target_epsilon=None, noise_multiplier=0.0, max_grad_norm=1.0, delta=1e-4, clipping=clipping)
    return DPEngine(Overflowing(), ds, privacy, dataset_size=1000, expected_batch_size=4, planned_steps=2, loss_fn=loss,
                    world=init_distributed(), key=SecretKey.from_seed(0))


def batch(poisoned: bool, mask=(1.0, 1.0, 1.0, 1.0)):
    ids = torch.tensor([[1, 2, 3], [4, 5, 6], [7, 8, 9], [10, 1, 2]])
    if poisoned:
        ids[2, 1] = OVERFLOW
    return {"input_ids": ids, "labels": torch.tensor([0, 1, 0, 1]), "sample_mask": torch.tensor(mask)}


def params(engine):
    return {n: p.detach().clone() for n, p in engine.module.named_parameters()}


def test_flat_stops_before_the_update():
    engine = make_engine("flat")
    before = params(engine)
    with pytest.raises(NonFiniteGradientError, match="non-finite gradient reached the DP step.*with flat the run must stop"):
        engine.train_step([batch(poisoned=True)], 4)
    after = params(engine)
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert engine.steps_done == 0 and engine.accountant.steps == 0


def test_per_layer_drops_the_sample():
    engine = make_engine("per_layer")
    before = params(engine)
    engine.train_step([batch(poisoned=True)], 4)
    got = params(engine)
    assert all(torch.isfinite(p).all() for p in got.values())
    reference = make_engine("per_layer")  # same init; the poisoned row as padding instead
    reference.train_step([batch(poisoned=False, mask=(1.0, 1.0, 0.0, 1.0))], 3)
    for n, p in params(reference).items():
        torch.testing.assert_close(got[n], p, rtol=1e-6, atol=1e-7)
        assert not torch.equal(got[n], before[n]) or n == "embed.weight"
