"""privacy.noise_sampler: DP-SGD noise drawn on the CUDA device (three keyed Philox streams, XOR-ed).

What runs on the CPU: the choice of sampler and its refusals, the device sampler's start-up self-test
(fed by the host sampler and by broken samplers), and the construction itself on torch's CPU generator
(against a numpy reimplementation, and the review's single-key attack). What needs a GPU (skipped
without one; bench/gpu.sh runs this file there): the CUDA draws and one DP step whose noise is rebuilt
from the key.
"""

from __future__ import annotations

import math
import os
import warnings

import numpy as np
import pytest
import torch

from dist_dpc.privacy import PrivacyConfig
from dist_dpc.privacy import noise as noise_module
from dist_dpc.privacy import randomness
from dist_dpc.privacy.noise import (NoiseSamplerError, add_gaussian_noise_, check_device_sampler, choose_noise_sampler,
                                    decide_noise_sampler, replica_fingerprints_differ)
from dist_dpc.privacy.randomness import SecretKey, add_gaussian_, add_gaussian_cuda_

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device (bench/gpu.sh runs this file on one)")


# -- on the CPU --------------------------------------------------------------------------------
def test_unknown_sampler_is_refused_with_the_allowed_values():
    with pytest.raises(ValueError, match=r"privacy.noise_sampler='gpu' is invalid: allowed values are 'auto', 'host', 'device'"):
        PrivacyConfig(noise_sampler="gpu")


def test_cpu_tensors_use_the_host_and_device_is_refused_naming_the_field():
    key = SecretKey.generate()
    cpu = [torch.zeros(10)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a CPU run is not a degraded GPU run: no warning
        assert choose_noise_sampler("auto", cpu, replicated=False, world_size=1, key=key) is False
    assert choose_noise_sampler("host", cpu, replicated=True, world_size=2, key=key) is False  # no collective
    with pytest.raises(NoiseSamplerError, match=r"privacy.noise_sampler=device: rank 0: the optimizer partition is on "
                                                r"cpu .*Set privacy.noise_sampler=auto \(the host draws the noise then\) or host"):
        choose_noise_sampler("device", cpu, replicated=False, world_size=1, key=key)


def test_the_cuda_draw_refuses_a_host_tensor():
    with pytest.raises(ValueError, match="draws on a CUDA device; this tensor is on cpu"):
        add_gaussian_cuda_(torch.zeros(4), 1.0, SecretKey.generate(), "x")


def test_replica_fingerprints_name_the_rank_that_differs():
    assert replica_fingerprints_differ(["t|12.8|H100|132|2048"] * 3) == ""
    differing = replica_fingerprints_differ(["t|12.8|H100|132|2048", "t|12.8|H100|132|2048", "t|12.8|H100 MIG|16|2048"])
    assert differing.startswith("rank 2: t|12.8|H100 MIG|16|2048 vs rank 0") and "rank 1" not in differing


# The device construction (XOR of three keyed streams, Box-Muller in float64) runs on any device; on the
# CPU torch's generator is mt19937 instead of Philox, which is enough to test everything but the kernel.
def _stream_bits(key, labels, chunk, stream, words):
    generator = torch.Generator()
    generator.manual_seed(key.uint64(*labels, "device-chunk", chunk, "stream", stream))
    return torch.empty(words, dtype=torch.int64).random_(generator=generator).numpy().astype(np.uint64)


def _box_muller(bits: np.ndarray, count: int) -> np.ndarray:
    """A second implementation, in numpy: 53-bit uniforms in (0, 1), pairs (first half, second half)."""
    u = ((bits >> np.uint64(10)).astype(np.float64) + 0.5) / 2.0 ** 53
    half = len(u) // 2
    r, theta = np.sqrt(-2 * np.log(u[:half])), 2 * np.pi * u[half:]
    return np.concatenate([r * np.cos(theta), r * np.sin(theta)])[:count]


def test_construction_is_the_xor_of_three_keyed_streams_through_box_muller():
    key, labels, count = SecretKey.generate(), ("dp-sgd", 3, 0, 1), 10_001
    values = torch.zeros(count, dtype=torch.float64)
    randomness._add_keyed_box_muller_(values, 0.7, key, *labels)
    words = 2 * ((count + 1) // 2)
    bits = [_stream_bits(key, labels, 0, s, words) for s in range(3)]
    np.testing.assert_allclose(values.numpy(), 0.7 * _box_muller(bits[0] ^ bits[1] ^ bits[2], count), rtol=1e-12, atol=1e-12)
    assert bool(torch.isfinite(values).all())


def test_no_single_stream_or_pair_of_streams_can_be_scored_on_its_own():
    """The review's attack on a sum of two keyed normals: the noise correlated ~0.71 with each half, so
    each 64-bit key could be found by its own scan. With the XOR, every part short of all three
    streams is independent of the noise: correlation within 5 standard errors of 0."""
    key, labels, count = SecretKey.generate(), ("dp-sgd", 0, 0, 0), 200_000
    noise = torch.zeros(count, dtype=torch.float64)
    randomness._add_keyed_box_muller_(noise, 1.0, key, *labels)
    bits = [_stream_bits(key, labels, 0, s, count) for s in range(3)]
    for name, part in (("a", bits[0]), ("b", bits[1]), ("c", bits[2]), ("a^b", bits[0] ^ bits[1]),
                       ("b^c", bits[1] ^ bits[2]), ("a^c", bits[0] ^ bits[2])):
        guess = _box_muller(part, count)
        corr = float(np.corrcoef(noise.numpy(), guess)[0, 1])
        assert abs(corr) < 5 / math.sqrt(count), (name, corr)
    full = _box_muller(bits[0] ^ bits[1] ^ bits[2], count)
    assert float(np.corrcoef(noise.numpy(), full)[0, 1]) > 0.999999


def test_construction_gives_n0_std2_and_depends_on_key_labels_and_chunk(monkeypatch):
    key = SecretKey.generate()

    def draw(k, *labels, numel=1 << 20, dtype=torch.float32, std=1.0):
        t = torch.zeros(numel, dtype=dtype)
        randomness._add_keyed_box_muller_(t, std, k, *labels)
        return t

    v = draw(key, "moments", std=0.3).double() / 0.3
    n = v.numel()
    assert abs(float(v.mean())) < 6 / math.sqrt(n)
    assert abs(float(v.std()) - 1) < 6 / math.sqrt(2 * n)
    assert abs(float((v ** 4).mean()) - 3) < 6 * math.sqrt(96 / n)  # z^4: mean 3, variance 96
    for k in (1, 2, 3, 4):
        p = math.erfc(k / math.sqrt(2))
        assert abs(float((v.abs() > k).double().mean()) - p) < 6 * math.sqrt(p * (1 - p) / n) + 1e-6, k
    assert torch.equal(draw(key, "a", 1, numel=10_000), draw(key, "a", 1, numel=10_000))
    for other in (draw(key, "a", 2, numel=10_000), draw(SecretKey.generate(), "a", 1, numel=10_000)):
        corr = torch.corrcoef(torch.stack([draw(key, "a", 1, numel=10_000), other]))[0, 1]
        assert abs(float(corr)) < 5 / math.sqrt(10_000)
    # Chunks get their own generators: no value of one chunk reappears in another.
    monkeypatch.setattr(randomness, "DEVICE_CHUNK", 1000)
    chunked = draw(key, "c", numel=2500)
    # (in float64: 2500 float32 normals share a value by chance in about 4 % of draws)
    assert torch.unique(draw(key, "c", numel=2500, dtype=torch.float64)).numel() == 2500
    # bf16 targets get the float32 draw rounded once; a non-contiguous target is noised in place.
    torch.testing.assert_close(draw(key, "c", numel=2500, dtype=torch.bfloat16), chunked.to(torch.bfloat16))
    strided = torch.zeros(50, 40).t()
    randomness._add_keyed_box_muller_(strided, 1.0, key, "c")
    torch.testing.assert_close(strided.reshape(-1), chunked[:2000])


def _status(problem="", digest="d", fingerprint="t|12.8|H100|132|2048", on_cuda=True):
    return {"on_cuda": on_cuda, "fingerprint": fingerprint, "digest": digest, "problem": problem}


def test_the_ranks_decide_together_and_name_the_rank_that_cannot():
    good = [_status(), _status()]
    assert decide_noise_sampler("auto", good, replicated=True) is True
    assert decide_noise_sampler("device", good, replicated=False) is True
    one_bad = [_status(), _status(problem="NoiseSamplerError: failed its self-test")]
    with pytest.warns(UserWarning, match=r"drawn on the host \(privacy.noise_sampler=auto\): rank 1: NoiseSamplerError"):
        assert decide_noise_sampler("auto", one_bad, replicated=False) is False
    with pytest.raises(NoiseSamplerError, match=r"privacy.noise_sampler=device: rank 1: NoiseSamplerError"):
        decide_noise_sampler("device", one_bad, replicated=False)
    # ZeRO 0 replicas whose self-test draws differ: the host for all (auto), refused (device). Disjoint
    # partitions (ZeRO >= 1) do not need identical draws.
    differ = [_status(digest="x"), _status(digest="y", fingerprint="t|12.8|H100 MIG|16|2048")]
    with pytest.warns(UserWarning, match=r"ZeRO 0 replicas must apply identical noise.*rank 1: t\|12.8\|H100 MIG"):
        assert decide_noise_sampler("auto", differ, replicated=True) is False
    with pytest.raises(NoiseSamplerError, match="ZeRO 0 replicas must apply identical noise"):
        decide_noise_sampler("device", differ, replicated=True)
    assert decide_noise_sampler("auto", differ, replicated=False) is True
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every rank on the CPU: the host, silently
        assert decide_noise_sampler("auto", [_status(problem="on cpu", on_cuda=False)] * 2, replicated=True) is False


def test_every_stream_is_keyed_by_all_64_bits_of_its_derived_key(monkeypatch):
    """The weakness that started the review is a short key; mt19937 (the CPU stand-in) keeps 32 bits
    of a seed, so the seeds themselves are checked: each generator gets key.uint64 of its labels."""
    key, seen = SecretKey.generate(), []
    real = randomness.stream_generator
    monkeypatch.setattr(randomness, "stream_generator", lambda device, seed: (seen.append(seed), real(device, seed))[1])
    monkeypatch.setattr(randomness, "DEVICE_CHUNK", 100)
    randomness._add_keyed_box_muller_(torch.zeros(1000), 1.0, key, "dp-sgd", 4, 1, 0)
    expected = [key.uint64("dp-sgd", 4, 1, 0, "device-chunk", chunk, "stream", stream)
                for chunk in range(10) for stream in range(3)]
    assert seen == expected and len(set(seen)) == 30
    assert max(seen) >= 2 ** 63 and max(seen) < 2 ** 64  # 30 uniform 64-bit keys: all below 2^63 has p = 1e-9
    seed = max(seen)
    assert real(torch.device("cpu"), seed).initial_seed() == seed


def test_box_muller_is_finite_at_the_extreme_words():
    extremes = torch.tensor([0, 2 ** 63 - 1, 0, 2 ** 63 - 1], dtype=torch.int64)  # radius words, then angle words
    z = randomness.box_muller_(extremes.clone())
    assert bool(torch.isfinite(z).all()) and float(z.abs().max()) <= math.sqrt(-2 * math.log(2.0 ** -54)) + 1e-9
    assert float(z.abs().max()) > 8.6  # the smallest uniform, 2^-54, gives the largest radius


def _host_sampler(values, std, key, *labels, on_device):
    assert on_device
    add_gaussian_(values, std, key, *labels)  # numpy Philox: a sampler known to be N(0, std^2)


@pytest.mark.parametrize("name, broken", [
    ("zeros", lambda values, *a, **k: None),
    ("half the variance", lambda values, std, key, *labels, on_device: add_gaussian_(values, std / math.sqrt(2), key, *labels)),
    ("variance 1.01", lambda values, std, key, *labels, on_device: add_gaussian_(values, std * 1.005, key, *labels)),
    ("uniform of variance 1", lambda values, *a, **k: values.uniform_(-math.sqrt(3), math.sqrt(3))),
    ("shifted by 0.01", lambda values, std, key, *labels, on_device: (add_gaussian_(values, std, key, *labels),
                                                                       values.add_(0.01))),
])
def test_the_self_test_passes_a_normal_sampler_and_fails_broken_ones(monkeypatch, name, broken):
    key = SecretKey.from_seed(3)
    monkeypatch.setattr(noise_module, "add_gaussian_", _host_sampler)
    check_device_sampler(torch.device("cpu"), key)  # the real N(0, 1) passes
    monkeypatch.setattr(noise_module, "add_gaussian_", broken)
    with pytest.raises(NoiseSamplerError, match=r"failed its self-test .*set privacy.noise_sampler=host"):
        check_device_sampler(torch.device("cpu"), key)


def test_a_cpu_engine_draws_on_the_host_and_refuses_device():
    from dist_dpc.engine import DPEngine, build_ds_config, init_distributed
    from dist_dpc.engine.losses import sequence_classification_loss
    from dist_dpc.models import ModelConfig, load_sequence_classifier

    world = init_distributed()

    def engine(sampler):
        model = load_sequence_classifier(ModelConfig(name="tiny-bert"), num_labels=2)
        ds = build_ds_config(None, micro_batch_size=4, world_size=1, zero_stage=0, lr=1e-3, weight_decay=0.0,
                             optimizer="adamw", bf16=False)
        return DPEngine(model, ds, PrivacyConfig(target_epsilon=None, noise_multiplier=1.0, noise_sampler=sampler),
                        dataset_size=1000, expected_batch_size=10, planned_steps=5, loss_fn=sequence_classification_loss,
                        world=world, key=SecretKey.generate())

    assert engine("auto").noise_on_device is False
    with pytest.raises(NoiseSamplerError, match="privacy.noise_sampler=device: rank 0: the optimizer partition is on cpu"):
        engine("device")


# -- on a GPU ----------------------------------------------------------------------------------
@needs_cuda
def test_device_draws_are_normal_with_the_requested_std_and_pass_the_self_test():
    key = SecretKey.generate()
    check_device_sampler(torch.device("cuda"), key)
    values = torch.zeros(1 << 23, device="cuda")
    add_gaussian_(values, 0.3, key, "moments", on_device=True)
    v = values.double() / 0.3
    n = v.numel()
    assert abs(float(v.mean())) < 6 / math.sqrt(n)
    assert abs(float(v.std()) - 1) < 6 / math.sqrt(2 * n)
    assert abs(float((v ** 4).mean()) - 3) < 6 * math.sqrt(96 / n)  # kurtosis of N(0, 1): 3, variance of z^4 96
    for k in (1, 2, 3, 4):  # tail masses against erfc, within 6 binomial standard errors
        p = math.erfc(k / math.sqrt(2))
        assert abs(float((v.abs() > k).double().mean()) - p) < 6 * math.sqrt(p * (1 - p) / n) + 1e-7, k


# Philox4x32-10 (Salmon et al. 2011), the generator behind torch's CUDA random_, written out in numpy as
# an independent reference; the known-answer vectors are Random123's.
PHILOX_M, PHILOX_W, MASK32 = (0xD2511F53, 0xCD9E8D57), (0x9E3779B9, 0xBB67AE85), np.uint64(0xFFFFFFFF)


def philox4x32_10(counter, key):
    c0, c1, c2, c3 = (np.asarray(c, dtype=np.uint64) for c in counter)
    k0, k1 = np.uint64(key[0]), np.uint64(key[1])
    for _ in range(10):
        p0, p1 = np.uint64(PHILOX_M[0]) * c0, np.uint64(PHILOX_M[1]) * c2
        c0, c1, c2, c3 = (p1 >> np.uint64(32)) ^ c1 ^ k0, p1 & MASK32, (p0 >> np.uint64(32)) ^ c3 ^ k1, p0 & MASK32
        k0, k1 = (k0 + np.uint64(PHILOX_W[0])) & MASK32, (k1 + np.uint64(PHILOX_W[1])) & MASK32
    return c0, c1, c2, c3


def test_the_philox_reference_matches_random123s_known_answers():
    for counter, key, answer in (
            ((0, 0, 0, 0), (0, 0), (0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8)),
            ((0xffffffff,) * 4, (0xffffffff,) * 2, (0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd)),
            ((0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344), (0xa4093822, 0x299f31d0),
             (0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1))):
        assert tuple(int(v) for v in philox4x32_10(counter, key)) == answer


def cuda_words(seed: int, count: int) -> np.ndarray:
    """What torch's CUDA random_ writes into a fresh int64 tensor of ``count`` <= 512 elements (one thread
    per element, grid of 256-thread blocks, offset 0): thread i's first curand4 (x, y, z, w) of counter
    (0, 0, i, 0) under key (seed low 32 bits, seed high 32 bits), ((x << 32) | y) mod 2^63."""
    i = np.arange(count, dtype=np.uint64)
    zero = np.zeros(count, dtype=np.uint64)
    x, y, _, _ = philox4x32_10((zero, zero, i, zero), (seed & 0xFFFFFFFF, seed >> 32))
    return ((x << np.uint64(32)) | y) & np.uint64(2 ** 63 - 1)


@needs_cuda
def test_cuda_draws_equal_the_independent_philox_reference():
    seed = 0xF00DFACE_12345678  # >= 2^63: the high key word matters
    generator = randomness.stream_generator(torch.device("cuda"), seed)
    assert generator.initial_seed() == seed
    words = torch.empty(512, dtype=torch.int64, device="cuda").random_(generator=generator).cpu().numpy().astype(np.uint64)
    np.testing.assert_array_equal(words, cuda_words(seed, 512))
    assert not np.array_equal(cuda_words(seed, 512), cuda_words(seed ^ (1 << 40), 512))  # the high word is key
    # The whole device sampler, 512 values: the XOR of three keyed streams through Box-Muller.
    key, labels = SecretKey.generate(), ("dp-sgd", 2, 0, 0, 1)
    values = torch.zeros(512, device="cuda", dtype=torch.float64)
    add_gaussian_(values, 0.25, key, *labels, on_device=True)
    bits = np.zeros(512, dtype=np.uint64)
    for stream in range(3):
        bits ^= cuda_words(key.uint64(*labels, "device-chunk", 0, "stream", stream), 512)
    np.testing.assert_allclose(values.cpu().numpy(), 0.25 * _box_muller(bits, 512), rtol=1e-12, atol=1e-12)


@needs_cuda
def test_device_draws_depend_on_key_and_labels_only():
    key = SecretKey.generate()

    def draw(k, *labels, numel=10_000):
        t = torch.zeros(numel, device="cuda")
        add_gaussian_(t, 1.0, k, *labels, on_device=True)
        return t

    assert torch.equal(draw(key, "a", 1), draw(key, "a", 1))
    for other in (draw(key, "a", 2), draw(SecretKey.generate(), "a", 1)):
        corr = torch.corrcoef(torch.stack([draw(key, "a", 1), other]))[0, 1]
        assert abs(float(corr)) < 5 / math.sqrt(10_000)


@needs_cuda
def test_several_tensors_get_independent_draws():
    key = SecretKey.generate()
    tensors = [torch.zeros(5000, device="cuda"), torch.zeros(5000, device="cuda")]
    add_gaussian_noise_(tensors, 1.0, key, "dp-sgd", 0, 0, 0, on_device=True)
    corr = torch.corrcoef(torch.stack(tensors))[0, 1]
    assert abs(float(corr)) < 5 / math.sqrt(5000)


@needs_cuda
@pytest.mark.skipif(os.environ.get("DS_ACCELERATOR") != "cuda", reason="DeepSpeed on the GPU: DS_ACCELERATOR=cuda")
@pytest.mark.parametrize("sampler", ["auto", "host"])
def test_one_dp_step_on_the_gpu_applies_the_keyed_draws_once(sampler):
    """ZeRO 0, one rank, SGD at lr 1, a batch of padding rows only: the clipped sum is exactly zero, so
    the update is -(noise / B), and the noise is rebuilt from the key with the engine's labels."""
    from dist_dpc.engine import DPEngine, build_ds_config, init_distributed
    from dist_dpc.engine.losses import sequence_classification_loss
    from dist_dpc.models import ModelConfig, load_sequence_classifier
    from tests.engine.dp_worker import logical_batch, rank_micro_batches

    world = init_distributed()
    torch.manual_seed(0)
    model = load_sequence_classifier(ModelConfig(name="tiny-bert"), num_labels=2).cuda()
    trainable = [p for p in model.parameters() if p.requires_grad]
    initial = [p.detach().clone() for p in trainable]
    ds = build_ds_config({"optimizer": {"type": "SGD", "params": {"lr": 1.0}}}, micro_batch_size=4, world_size=1,
                         zero_stage=0, lr=1.0, weight_decay=0.0, optimizer="sgd", bf16=False)
    sigma, c, b = 1.5, 0.5, 8
    key = SecretKey.generate()
    engine = DPEngine(model, ds, PrivacyConfig(target_epsilon=None, noise_multiplier=sigma, max_grad_norm=c,
                                               noise_sampler=sampler),
                      dataset_size=1000, expected_batch_size=b, planned_steps=1, loss_fn=sequence_classification_loss,
                      world=world, key=key)
    assert engine.noise_on_device is (sampler == "auto")
    batch = logical_batch(model.config.vocab_size, 0, 9, 1)
    engine.train_step(rank_micro_batches(batch, 0, 1, 4, 1), logical_batch_size=0)
    expected = [torch.zeros_like(p) for p in initial]
    add_gaussian_noise_(expected, sigma * c, key, "dp-sgd", 0, 0, 0, on_device=engine.noise_on_device)
    for p, p0, noise in zip(trainable, initial, expected):
        torch.testing.assert_close(p.detach() - p0, -noise / b, rtol=1e-5, atol=1e-6)
