"""A sample that produces NaN/inf: per_layer and flat (book-keeping: the clipped sums are computed
from per-sample quantities, as per_layer's are) drop it at every ZeRO stage, so the update stays
finite and equals the update without it."""

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


def make_engine(clipping, stage=0):
    ds = build_ds_config({"optimizer": {"type": "SGD", "params": {"lr": 1.0}},
                          "zero_optimization": {"stage3_param_persistence_threshold": 0}}, micro_batch_size=4,
                         world_size=1, zero_stage=stage, lr=1.0, weight_decay=0.0, optimizer="sgd", bf16=False)
    privacy = PrivacyConfig(target_epsilon=None, noise_multiplier=0.0, max_grad_norm=1.0, delta=1e-4, clipping=clipping)
    return DPEngine(Overflowing(), ds, privacy, dataset_size=1000, expected_batch_size=4, planned_steps=2, loss_fn=loss,
                    world=init_distributed(), key=SecretKey.from_seed(0))


def batch(poisoned: bool, mask=(1.0, 1.0, 1.0, 1.0)):
    ids = torch.tensor([[1, 2, 3], [4, 5, 6], [7, 8, 9], [10, 1, 2]])
    if poisoned:
        ids[2, 1] = OVERFLOW
    return {"input_ids": ids, "labels": torch.tensor([0, 1, 0, 1]), "sample_mask": torch.tensor(mask)}


def params(engine):
    if engine.ds.zero_optimization_stage() == 3:  # one rank: its partition is the whole parameter
        return {n: p.ds_tensor.detach().clone() for n, p in engine.module.named_parameters()}
    return {n: p.detach().clone() for n, p in engine.module.named_parameters()}


@pytest.mark.parametrize("clipping, stage", [("per_layer", 0), ("per_layer", 3), ("flat", 0), ("flat", 2), ("flat", 3)])
def test_the_sample_is_dropped(clipping, stage):
    engine = make_engine(clipping, stage)
    before = params(engine)
    engine.train_step([batch(poisoned=True)], 4)
    got = params(engine)
    assert all(torch.isfinite(p).all() for p in got.values())
    reference = make_engine(clipping, stage)  # same init; the poisoned row as padding instead
    reference.train_step([batch(poisoned=False, mask=(1.0, 1.0, 0.0, 1.0))], 3)
    for n, p in params(reference).items():
        torch.testing.assert_close(got[n], p, rtol=1e-6, atol=1e-7)
        assert not torch.equal(got[n], before[n]) or n == "embed.weight"


def test_the_noise_hook_refuses_a_non_finite_gradient():
    """The hook's own check, reached directly: since both clipping modes drop non-finite samples, no
    whole run reaches it here."""
    engine = make_engine("per_layer")
    finite = [torch.ones(3), torch.zeros(2), torch.full((5,), -1e30), torch.ones(4, dtype=torch.bfloat16),
              torch.full((4096,), 16.0, dtype=torch.float16)]  # its fp16 sum would overflow to inf: not a NaN
    engine._check_finite(finite)
    nan, inf = float("nan"), float("inf")
    # The check sums each tensor: every non-finite pattern must still surface, including infinities
    # of both signs in one tensor (their sum is NaN) and one bad value among a million finite ones.
    big = torch.randn(1_000_000)
    big[654_321] = nan
    for bad in ([0.0, nan], [0.0, inf], [-inf, 1.0], [inf, -inf], [nan, inf, -inf]):
        for dtype in (torch.float32, torch.bfloat16, torch.float64):
            with pytest.raises(NonFiniteGradientError, match="non-finite gradient reached the DP step"):
                engine._check_finite([torch.ones(3), torch.tensor(bad, dtype=dtype)])
    with pytest.raises(NonFiniteGradientError):
        engine._check_finite([big])
    strided = torch.ones(6, 4).t()[:, ::2].clone().t()  # non-contiguous views with a NaN
    strided[1, 2] = nan
    for bad in (torch.ones(6, 4)[:, 1:].masked_fill(torch.eye(6, 3, dtype=torch.bool), inf), strided.t(),
                torch.tensor(nan).expand(5), torch.tensor(-inf), torch.ones(3, dtype=torch.float16).masked_fill(
                    torch.tensor([False, True, False]), nan)):
        with pytest.raises(NonFiniteGradientError):
            engine._check_finite([torch.ones(2), bad])
