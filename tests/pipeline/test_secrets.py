"""A finished run tree may be released: in secure mode no file in it holds the noise key, and what
holds secrets anyway (checkpoints, the tokenised private data) is 0600 in 0700 directories."""

from __future__ import annotations

import base64
import os
import stat

import pytest

from dist_dpc.privacy.randomness import SecretKey
from tests.pipeline.test_train import ROOT
from tests.wandb_files import read_run

TINY = ["model.name=tiny-bert", "data.synthetic_size=200", "data.max_length=16", "train.batch_size=20",
        "train.micro_batch_size=8", "train.lr=5e-3", "privacy.target_epsilon=4", "train.max_steps=3",
        "train.checkpoint_every=1", "train.keep_checkpoints=2", "wandb.mode=offline"]


def encodings(raw: bytes) -> list[bytes]:
    """The forms a 32-byte key could take in a file."""
    out = [raw, raw.hex().encode(), raw.hex().upper().encode(), base64.b64encode(raw), base64.b64encode(raw)[:40]]
    for order in ("little", "big"):
        value = int.from_bytes(raw, order)
        out += [str(value).encode(), str(value & (2**64 - 1)).encode(), hex(value).encode()]
    return out


@pytest.fixture(scope="module")
def secure_run(tmp_path_factory):
    """`dpc train` in this process, capturing the keys it generates (never readable otherwise)."""
    from dist_dpc.pipeline.config import load_config
    from dist_dpc.pipeline.trainer import run_train

    generated = []
    original = SecretKey.generate.__func__

    def capture(cls):
        key = original(cls)
        generated.append(key)
        return key

    tmp = tmp_path_factory.mktemp("secure")
    mp = pytest.MonkeyPatch()
    mp.setattr(SecretKey, "generate", classmethod(capture))
    mp.chdir(tmp)
    try:
        cfg = load_config(str(ROOT / "configs" / "debug.yaml"), [f"run.output_dir={tmp}", "run.name=s", *TINY])
        run_train(cfg)
    finally:
        mp.undo()
    assert generated, "the run drew no key from the OS"
    return tmp / "s", generated


@pytest.mark.timeout(600)
def test_no_file_in_the_run_tree_holds_the_key(secure_run):
    run, generated = secure_run
    keys = [*generated, *(k.derive("phase", "train") for k in generated)]
    keys += [k.derive("phase", "train").derive(use) for k in generated for use in ("dp-sgd", "sampling")]
    needles = [e for k in keys for e in encodings(k._key)]
    files = [p for p in run.rglob("*") if p.is_file()]
    assert any(p.name == "config.yaml" for p in files) and any(p.suffix == ".wandb" for p in files)
    assert any("checkpoints" in p.parts for p in files) and not (run / "noise_seed.json").exists()
    for path in files:
        data = path.read_bytes()
        for needle in needles:
            assert needle not in data, f"{path} holds the noise key"
    (wandb_dir,) = list((run / "wandb").glob("offline-run-*"))
    config = read_run(wandb_dir)["config"]
    privacy = config.get("privacy") or {k.split(".", 1)[1]: v for k, v in config.items() if k.startswith("privacy.")}
    assert privacy["randomness"] == "secure" and privacy["noise_seed"] is None


@pytest.mark.timeout(600)
def test_secrets_are_0600_in_0700_directories(secure_run):
    run, _ = secure_run

    def mode(path):
        return stat.S_IMODE(os.stat(path).st_mode)

    assert mode(run) == 0o700
    for directory in (run / "cache", run / "checkpoints"):
        assert mode(directory) == 0o700, directory
        inside = list(directory.rglob("*"))
        assert any(p.is_file() for p in inside), directory
        for p in inside:
            assert mode(p) == (0o700 if p.is_dir() else 0o600), p
