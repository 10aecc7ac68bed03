"""The secret key behind noise and sampling: >= 128-bit generators, derivations, nothing leaks."""

from __future__ import annotations

import copy
import json
import os
import pickle
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dist_dpc.privacy.config import PrivacyConfig
from dist_dpc.privacy.noise import add_gaussian_noise_
from dist_dpc.privacy.randomness import CHUNK, SecretKey


def noise(key: SecretKey, numel: int = 1000, *labels) -> torch.Tensor:
    t = torch.zeros(numel)
    add_gaussian_noise_([t], 1.0, key, *labels)
    return t


def test_seeds_equal_in_their_low_32_bits_give_different_noise():
    low, high = 5, 5 + 2**32
    # Why: torch's CPU generator keeps only the low 32 bits of a seed, so a noisy release keyed by
    # an int seed could be de-noised by trying 2^32 seeds. This is what the old code did.
    old = [torch.randn(1000, generator=torch.Generator().manual_seed(s)) for s in (low, high)]
    assert torch.equal(*old)
    assert not torch.equal(noise(SecretKey.from_seed(low)), noise(SecretKey.from_seed(high)))


def test_draws_are_a_function_of_key_and_labels_and_have_unit_std():
    key = SecretKey.from_seed(1)
    a, b = noise(key, 200_000, "dp-sgd", 3, 0, 0), noise(key, 200_000, "dp-sgd", 3, 0, 0)
    assert torch.equal(a, b)
    assert abs(float(a.std()) - 1) < 0.01 and abs(float(a.mean())) < 0.01
    # Any label, and the key, changes the draws; so does a fresh OS key.
    for other in (noise(key, 200_000, "dp-sgd", 4, 0, 0), noise(key, 200_000, "dp-sgd", 3, 1, 0),
                  noise(key, 200_000, "dp-sgd", 3, 0, 1), noise(SecretKey.generate(), 200_000, "dp-sgd", 3, 0, 0)):
        assert abs(float(torch.corrcoef(torch.stack([a, other]))[0, 1])) < 0.02


def test_tensors_of_one_call_get_independent_draws_and_large_ones_are_chunked():
    key = SecretKey.generate()
    big, small = torch.zeros(CHUNK + 1000), torch.zeros(1000)
    add_gaussian_noise_([big, small], 2.0, key, "x")
    # float32 draws can be exactly 0 (about one in a few million): what matters is that no chunk is skipped.
    assert int((big == 0).sum()) < 5 and abs(float(big.std()) / 2 - 1) < 0.01
    assert not torch.equal(big[:1000], small)  # tensor index is part of the label
    assert not torch.equal(big[:1000], big[CHUNK:CHUNK + 1000])  # each chunk has its own generator
    # chunks are drawn by a thread pool: the draws depend on (key, labels) alone, not on the threads
    again = torch.zeros(CHUNK + 1000)
    add_gaussian_noise_([again], 2.0, key, "x")
    assert torch.equal(again, big)


def test_derivations_are_distinct_and_one_way():
    root = SecretKey.from_seed(0)
    keys = [root, root.derive("phase", "train"), root.derive("phase", "teacher"), root.derive("prune-round", 1),
            root.derive("prune-round", 1, "x"), root.derive("prune-round1")]
    assert len({k.fingerprint() for k in keys}) == len(keys)
    assert root.derive("a").fingerprint() == root.derive("a").fingerprint()
    with pytest.raises(TypeError):
        root.derive(1.5)


def test_the_key_never_shows_pickles_or_converts():
    key = SecretKey.generate()
    raw = key._key
    for text in (repr(key), str(key), f"{key}", repr(SimpleNamespace(k=key))):
        assert raw.hex() not in text and "hidden" in text
    with pytest.raises(TypeError, match="never serialised"):
        pickle.dumps(key)
    with pytest.raises(TypeError):
        torch.save({"k": key}, "/dev/null")
    with pytest.raises(TypeError):
        int(key)
    assert copy.deepcopy(key) is key


def test_noise_seed_needs_the_insecure_mode():
    with pytest.raises(ValueError, match=r"privacy.noise_seed=7 .* privacy.randomness=insecure_reproducible"):
        PrivacyConfig(noise_seed=7)
    assert PrivacyConfig(noise_seed=7, randomness="insecure_reproducible").noise_seed == 7
    with pytest.raises(ValueError, match="privacy.randomness"):
        PrivacyConfig(randomness="reproducible")


def test_insecure_mode_keeps_its_seed_file_private(tmp_path):
    from dist_dpc.pipeline.run_dir import RunDir

    run = RunDir(tmp_path, SimpleNamespace(is_main=True, world_size=1, rank=0))
    privacy = PrivacyConfig(randomness="insecure_reproducible")
    first = run.noise_key(privacy)
    seed_file = tmp_path / "noise_seed.json"
    assert os.stat(seed_file).st_mode & 0o777 == 0o600
    assert json.loads(seed_file.read_text())["seed"] >= 0
    assert run.noise_key(privacy).fingerprint() == first.fingerprint()  # a resumed run: same streams
    # secure: a fresh key every time, and nothing written
    seed_file.unlink()
    secure = [run.noise_key(PrivacyConfig()) for _ in range(2)]
    assert secure[0].fingerprint() != secure[1].fingerprint() and not seed_file.exists()


def test_sampler_key_not_in_its_state():
    from dist_dpc.privacy.sampling import PoissonSampler

    s = PoissonSampler(dataset_size=100, expected_batch_size=10, micro_batch_size=4, rank=0, world_size=1,
                       key=SecretKey.generate())
    assert s.state_dict() == {"kind": "PoissonSampler"}
    assert isinstance(np.asarray(s.plan(0).micro_batches[0]), np.ndarray)
