"""`dpc generate`: the plan covers every sample once for any split of the work; sampling is
reproducible for a seed and independent of shards; a killed generation resumes to exactly the
requested samples; the output is a dataset with each sample's control codes; classifiers are refused."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from dist_dpc.data.lm import control_prefix
from dist_dpc.pipeline.config import GenerateConfig
from dist_dpc.pipeline.generate import mine, plan_batches, read_prompts
from tests.pipeline.test_train import ROOT, dpc, env
from tests.tasks.test_causal_lm import write_yelp

def dpc_shard(args, shard: int):
    """`dpc` as one task of a SLURM array would run it (its shard index in the environment)."""
    return subprocess.run([sys.executable, "-m", "dist_dpc.cli", *args], capture_output=True, text=True, timeout=300,
                          env=dict(env(), DPC_GENERATE_SHARD=str(shard)), cwd=ROOT)


BARS, RESTAURANTS = "Business Category: Bars\tReview Stars: 5.0", "Business Category: Restaurants\tReview Stars: 1.0"


def test_plan_covers_every_sample_once_for_any_shards_and_ranks():
    prompts = read_prompts(GenerateConfig(prompts={BARS: 7, RESTAURANTS: 0, "": 5}))
    batches = plan_batches(prompts, batch_size=3)
    assert [b.size for b in batches] == [3, 3, 1, 3, 2] and [b.codes for b in batches][-1] == ()
    ids = [i for b in batches for i in range(b.first_id, b.first_id + b.size)]
    assert ids == list(range(12))
    for shards in (1, 2, 3, 7):
        for world in (1, 2, 3):
            owned = [b.index for s in range(shards) for r in range(world) for b in mine(batches, s, shards, r, world)]
            assert sorted(owned) == list(range(len(batches))), (shards, world)
    with pytest.raises(ValueError, match="no samples requested"):
        read_prompts(GenerateConfig())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    write_yelp(root / "train.csv", 120, 0, "train")
    write_yelp(root / "test.csv", 20, 1, "test")
    args = [str(ROOT / "configs" / "debug_lm.yaml"), f"run.output_dir={root}", "data.task=yelp",
            f"data.train_file={root / 'train.csv'}", f"data.eval_file={root / 'test.csv'}", "train.max_steps=2"]
    proc = dpc(["train", *args, "run.name=lm"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root, args


def generate_args(args, name, samples=8, batch=2, shards=1, tokens=12):
    prompts = json.dumps({BARS: samples - samples // 2, RESTAURANTS: samples // 2})
    return ["generate", *args, f"run.name={name}", f"generate.source={args[1].split('=', 1)[1]}/lm/model",
            f"generate.prompts={prompts}", f"generate.batch_size={batch}", f"generate.shards={shards}",
            f"generate.max_new_tokens={tokens}", "generate.no_repeat_ngram_size=2"]


def samples(root, name):
    return [json.loads(x) for x in (root / name / "generate" / "samples.jsonl").read_text().splitlines()]


@pytest.mark.timeout(600)
def test_reproducible_independent_of_shards_and_respects_prompts(trained):
    root, args = trained
    one = dpc(generate_args(args, "one"))
    assert one.returncode == 0, one.stderr[-3000:]
    a = samples(root, "one")
    assert [r["id"] for r in a] == list(range(8))
    assert [r["codes"] for r in a] == [BARS.split("\t")] * 4 + [RESTAURANTS.split("\t")] * 4
    assert all(r["prompt"] == control_prefix(r["codes"]) for r in a)
    assert len({r["text"] for r in a}) > 1  # sampled, not one greedy string
    # Two shards run one at a time (as two SLURM array tasks would): the same samples.
    first = dpc_shard(generate_args(args, "two", shards=2), 0)
    assert first.returncode == 0, first.stderr[-3000:]
    assert not (root / "two" / "generate" / "samples.jsonl").exists()  # shard 1's batches are missing
    second = dpc_shard(generate_args(args, "two", shards=2), 1)
    assert second.returncode == 0, second.stderr[-3000:]
    assert samples(root, "two") == a
    # Two torchrun ranks splitting one shard: the same samples again.
    from tests.engine.launch import torchrun

    torchrun("dist_dpc/cli.py", generate_args(args, "ranks"), world_size=2, timeout=300)
    assert samples(root, "ranks") == a
    from datasets import load_dataset

    ds = load_dataset("json", data_files=str(root / "two" / "generate" / "samples.jsonl"), split="train")
    assert len(ds) == 8 and ds[0]["codes"] == BARS.split("\t")
    # A resumed tree refuses another plan instead of mixing samples.
    other = dpc(generate_args(args, "one", tokens=13))
    assert other.returncode == 2 and "another plan" in other.stderr


@pytest.mark.timeout(600)
def test_killed_generation_resumes_to_exactly_the_requested_samples(trained):
    root, args = trained
    cmd = [sys.executable, "-m", "dist_dpc.cli", *generate_args(args, "kill", samples=60, batch=1, tokens=48)]
    proc = subprocess.Popen(cmd, env=env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    batches = root / "kill" / "generate" / "batches"
    deadline = time.time() + 300
    while time.time() < deadline and len(list(batches.glob("batch-*.jsonl"))) < 3:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = {f.name: f.read_text() for f in batches.glob("batch-*.jsonl")}
    assert 3 <= len(before) < 60, len(before)
    assert not (root / "kill" / "generate" / "samples.jsonl").exists()
    again = dpc(generate_args(args, "kill", samples=60, batch=1, tokens=48))
    assert again.returncode == 0, again.stderr[-3000:]
    assert all((batches / name).read_text() == text for name, text in before.items())  # not redone
    out = samples(root, "kill")
    assert [r["id"] for r in out] == list(range(60))
    straight = dpc(generate_args(args, "straight", samples=60, batch=1, tokens=48))
    assert straight.returncode == 0 and samples(root, "straight") == out


def test_source_without_dp_lineage_is_refused_and_the_guarantee_is_stated(trained, tmp_path):
    root, args = trained
    # A model trained on the private data without DP: its samples would carry no guarantee.
    plain = dpc(["train", *args, "run.name=nodp", "privacy.enabled=false"])
    assert plain.returncode == 0, plain.stderr[-3000:]
    refused = dpc([a if not a.startswith("generate.source=") else f"generate.source={root / 'nodp' / 'model'}"
                   for a in generate_args(args, "from-nodp")])
    assert refused.returncode == 2 and "WITHOUT differential privacy" in refused.stderr
    assert not (root / "from-nodp" / "generate" / "samples.jsonl").exists()
    # In the training tree itself (`dpc train` wrote results.json at its root): runs, and says epsilon.
    here = dpc(["generate", *args, "run.name=lm", "generate.prompts={'': 2}", "generate.max_new_tokens=4"])
    assert here.returncode == 0, here.stderr[-3000:]
    summary = json.loads((root / "lm" / "generate" / "summary.json").read_text())
    trained_eps = json.loads((root / "lm" / "results.json").read_text())["epsilon"]
    assert summary["private"] and summary["generation_spent"] == 0.0
    assert abs(summary["epsilon"] - trained_eps) < 1e-9  # the samples' guarantee is the model's
    again = dpc(["generate", *args, "run.name=lm", "generate.prompts={'': 2}", "generate.max_new_tokens=4"])
    assert again.returncode == 0  # a finished generation reruns as a no-op (nothing left to do)


def test_generation_of_a_classifier_is_refused(tmp_path):
    proc = dpc(["generate", str(ROOT / "configs" / "debug.yaml"), f"run.output_dir={tmp_path}",
                "generate.prompts={'': 2}"])
    assert proc.returncode == 2 and "generate belongs to the synthetic-text path of a causal LM" in proc.stderr
