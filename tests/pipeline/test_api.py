"""`dist_dpc.initialize`: a user's own DeepSpeed loop gets the DP step, Poisson batches and a ledger.
The step against the per-example reference, the ledger against opacus' PRV, the refusals against the
engine's own messages, and the example script under the real `deepspeed` launcher on 2 ranks."""

from __future__ import annotations

import copy
import csv
import json
import random
import subprocess

import pytest
import torch

import dist_dpc
from dist_dpc.engine import build_ds_config
from dist_dpc.models import ModelConfig, load_sequence_classifier, load_tokenizer
from dist_dpc.pipeline.api import default_loss
from dist_dpc.privacy.randomness import SecretKey
from dist_dpc.privacy.clipper import PerSampleClipper
from tests.engine.dp_worker import logical_batch
from tests.pipeline.test_deepspeed_launcher import DEEPSPEED, env, free_port
from tests.pipeline.test_train import ROOT
from tests.reference import classifier_loss, clipped_sum, per_example_grads

N = 120
SGD = {"type": "SGD", "params": {"lr": 1000.0}}  # large: the update, not float32 rounding, dominates


def examples(n: int = N, seed: int = 5) -> list[dict]:
    batch = logical_batch(model().config.vocab_size, n, 9, seed)
    return [{k: v[i] for k, v in batch.items()} for i in range(n)]


def model(seed: int = 3):
    return load_sequence_classifier(ModelConfig(name="tiny-bert", dropout=0.0), num_labels=2, seed=seed)


def config(**extra) -> dict:
    return {"train_batch_size": 12, "train_micro_batch_size_per_gpu": 5, "optimizer": SGD,
            "zero_optimization": {"stage": 0}, **extra}


@pytest.mark.parametrize("clipping", ["per_layer", "flat"])
def test_one_step_equals_the_per_example_reference(clipping, tmp_path):
    """Noise off: the update is -lr * sum_i clip(g_i) / B over the examples of the Poisson draw."""
    net, data = model(), examples()
    reference_model = copy.deepcopy(net).double()
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    privacy = dist_dpc.PrivacyConfig(target_epsilon=None, noise_multiplier=0.0, max_grad_norm=0.05, clipping=clipping)
    engine, _, loader, scheduler = dist_dpc.initialize(model=net, config=config(), privacy=privacy, training_data=data,
                                                       steps=2, ledger=tmp_path / "ledger.json")
    assert scheduler is None and len(loader) == 2
    batch = next(iter(loader))
    rows = [int(i) for micro in loader.sampler.plan(0).micro_batches for i in micro]  # step 0's Poisson draw
    assert batch.logical_batch_size == len(rows) > 0
    assert all(m["input_ids"].shape == (5, 9) for m in batch.micro_batches)
    assert sum(int(m["sample_mask"].sum()) for m in batch.micro_batches) == len(rows)
    assert engine.train_batch(batch) is None  # DP on (noise 0 here): exact batch statistics are not returned
    real = {k: torch.stack([data[i][k] for i in rows]) for k in data[0]}
    grads = per_example_grads(reference_model, real, classifier_loss)
    expected = {n: -1000.0 * g / 12 for n, g in clipped_sum(reference_model, grads, 0.05, clipping).items()}
    after = dict(engine.module.named_parameters())
    diff = torch.cat([(after[n].detach().double() - before[n].double() - d).flatten() for n, d in expected.items()])
    ref = torch.cat([d.flatten() for d in expected.values()])
    assert float(diff.norm() / ref.norm()) < 1e-5
    with pytest.raises(ValueError, match="drawn for step 0, the engine is at step 1"):
        engine.train_batch(batch)  # a replayed batch would be sampled twice


def test_the_ledger_holds_each_run_and_a_rerun_composes(tmp_path):
    from opacus.accountants import PRVAccountant

    ledger = tmp_path / "ledger.json"
    engine, _, loader, _ = dist_dpc.initialize(model=model(), config=config(), training_data=examples(),
                                               privacy=dist_dpc.PrivacyConfig(target_epsilon=6.0), steps=8, ledger=ledger)
    entry = json.loads(ledger.read_text())["phases"]["train"]
    assert entry["status"] == "running" and entry["mechanisms"][0]["steps"] == 8  # reserved before any private read
    for i, batch in enumerate(loader):
        if i == 5:
            break  # the user stops early: only the steps taken are spent
        engine.train_batch(batch)
    first = engine.finish()
    engine.save_pretrained(tmp_path / "model")
    lineage = json.loads((tmp_path / "model" / "privacy_lineage.json").read_text())
    assert lineage["private"] and lineage["mechanisms"][0]["steps"] == 5
    engine2, _, loader2, _ = dist_dpc.initialize(model=model(), config=config(), training_data=examples(), steps=4,
                                                 privacy=dist_dpc.PrivacyConfig(target_epsilon=9.0), ledger=ledger)
    for batch in loader2:
        engine2.train_batch(batch)
    total = engine2.finish()
    phases = json.loads(ledger.read_text())["phases"]
    assert list(phases) == ["train", "train#2"] and all(p["status"] == "completed" for p in phases.values())
    assert phases["train"]["mechanisms"][0]["steps"] == 5 and phases["train#2"]["mechanisms"][0]["steps"] == 4
    accountant = PRVAccountant()
    accountant.history = [(m["noise_multiplier"], m["sample_rate"], m["steps"]) for p in phases.values()
                          for m in p["mechanisms"]]
    delta = json.loads(ledger.read_text())["delta"]
    assert total == pytest.approx(accountant.get_epsilon(delta=delta, eps_error=0.01), abs=0.05)
    assert first < total <= 9.0 * (1 + 1e-6)
    assert engine2.noise_multiplier != engine.noise_multiplier  # calibrated against what the ledger held


def refusal(tmp_path, **overrides) -> str:
    kwargs = dict(model=model(), config=config(), training_data=examples(), steps=4,
                  privacy=dist_dpc.PrivacyConfig(target_epsilon=4.0), ledger=tmp_path / "ledger.json")
    kwargs.update(overrides)
    with pytest.raises(Exception) as err:
        dist_dpc.initialize(**kwargs)
    ledger = tmp_path / "ledger.json"
    assert not ledger.exists() or json.loads(ledger.read_text())["phases"] == {}  # nothing reserved
    return str(err.value)


def test_what_the_engine_refuses_is_refused_with_its_message(tmp_path):
    unsafe = config(gradient_clipping=1.0)
    with pytest.raises(ValueError) as engine_error:
        build_ds_config({k: v for k, v in unsafe.items() if not k.startswith("train_")}, micro_batch_size=5,
                        world_size=1, zero_stage=None, lr=0.0, weight_decay=0.0, optimizer="adamw", bf16=False)
    assert refusal(tmp_path, config=unsafe) == str(engine_error.value)

    tied = model()
    tied.bert.encoder.layer[1].attention.self.query.weight = tied.bert.encoder.layer[0].attention.self.query.weight
    with pytest.raises(Exception) as clipper_error:
        PerSampleClipper(tied, 1.0)
    assert refusal(tmp_path, model=tied) == str(clipper_error.value)

    assert "delta" in refusal(tmp_path, privacy=dist_dpc.PrivacyConfig(target_epsilon=4.0, delta=1 / N))
    assert "too small for this privacy budget" in refusal(tmp_path, privacy=dist_dpc.PrivacyConfig(target_epsilon=0.05))
    assert "train_batch_size" in refusal(tmp_path, config={k: v for k, v in config().items() if k != "train_batch_size"})
    assert "\"optimizer\" block" in refusal(tmp_path, config={k: v for k, v in config().items() if k != "optimizer"})
    assert "steps=... or epochs=..." in refusal(tmp_path, steps=None)
    assert "not as objects" in refusal(tmp_path, optimizer=torch.optim.SGD(model().parameters(), lr=0.1))
    assert "dataset_size=99" in refusal(tmp_path, dataset_size=99)


def test_engine_backward_and_step_are_refused(tmp_path):
    engine, *_ = dist_dpc.initialize(model=model(), config=config(), training_data=examples(), steps=2,
                                     privacy=dist_dpc.PrivacyConfig(target_epsilon=4.0), ledger=tmp_path / "l.json")
    for call in (engine.backward, engine.step):
        with pytest.raises(RuntimeError, match="engine.train_batch"):
            call(torch.zeros(()))


@pytest.mark.timeout(600)
def test_the_example_script_under_the_deepspeed_launcher_on_two_ranks(tmp_path):
    """examples/deepspeed_loop.py as a user runs it: `deepspeed --num_gpus 2`, ZeRO 2, a local model."""
    from opacus.accountants import PRVAccountant
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    base = tmp_path / "base"
    tokenizer = load_tokenizer(ModelConfig(name="tiny-bert"), log=None)
    load_sequence_classifier(ModelConfig(name="tiny-bert"), num_labels=2, tokenizer=tokenizer, seed=0).save_pretrained(base)
    tokenizer.save_pretrained(base)
    rng = random.Random(0)
    with (tmp_path / "train.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", "label"])
        for _ in range(400):
            y = rng.randint(0, 1)
            writer.writerow([" ".join(rng.choice(["good", "great", "fine"] if y else ["bad", "awful", "dull"])
                                      for _ in range(6)), y])
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"train_batch_size": 40, "train_micro_batch_size_per_gpu": 8,
                              "optimizer": {"type": "AdamW", "params": {"lr": 5e-3, "torch_adam": True}},
                              "zero_optimization": {"stage": 2}}))
    out = tmp_path / "out"
    proc = subprocess.run([str(DEEPSPEED), "--num_gpus", "2", "--master_port", str(free_port()),
                           str(ROOT / "examples" / "deepspeed_loop.py"), "--model", str(base), "--train_file",
                           str(tmp_path / "train.csv"), "--deepspeed_config", str(ds), "--epochs", "1",
                           "--epsilon", "3", "--output_dir", str(out), "--ledger", str(tmp_path / "ledger.json"),
                           "--public_model"],
                          env=env(), cwd=ROOT, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    assert "dist_world_size=2" in proc.stdout + proc.stderr
    ledger = json.loads((tmp_path / "ledger.json").read_text())
    declared, entry = ledger["phases"].values()  # --public_model: the local base model, declared public
    assert declared["mechanisms"] == [] and list(ledger["phases"])[0] == f"public:{base.resolve()}"
    assert entry["status"] == "completed" and entry["mechanisms"][0]["steps"] == 10  # 1 epoch at q = 40/400
    accountant = PRVAccountant()
    accountant.history = [(m["noise_multiplier"], m["sample_rate"], m["steps"]) for m in entry["mechanisms"]]
    assert accountant.get_epsilon(delta=ledger["delta"], eps_error=0.01) == pytest.approx(3.0, abs=0.05)
    assert "epsilon 2.9" in proc.stdout or "epsilon 3.0" in proc.stdout
    trained = AutoModelForSequenceClassification.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    with torch.no_grad():
        logits = trained(**tok(["good great fine", "bad awful dull"], return_tensors="pt", padding=True)).logits
    untrained = AutoModelForSequenceClassification.from_pretrained(base).eval()
    with torch.no_grad():
        before = untrained(**tok(["good great fine", "bad awful dull"], return_tensors="pt", padding=True)).logits
    assert not torch.allclose(logits, before)  # it trained (and the ZeRO-2 weights were saved, not the initial ones)
    assert json.loads((out / "privacy_lineage.json").read_text())["private"] is True


def test_misuse_cannot_spend_more_than_the_ledger_says(tmp_path):
    """What the privacy review found: a second run sharing a running entry, a rewind by load_checkpoint, a
    retried failed step, a loss that mixes rows, and a step of the DeepSpeed engine behind the DP step."""
    ledger = tmp_path / "ledger.json"

    def start(name="train", epsilon=4.0, **ds):
        return dist_dpc.initialize(model=model(), config=config(**ds), training_data=examples(), steps=6, name=name,
                                   privacy=dist_dpc.PrivacyConfig(target_epsilon=epsilon, max_effective_noise=None),
                                   ledger=ledger)

    engine, _, loader, _ = start()
    batches = iter(loader)
    assert engine.train_batch(next(batches)) is None  # exact statistics of a private batch are not returned
    engine.save_checkpoint(tmp_path / "ckpt", "one")
    engine.train_batch(next(batches))
    with pytest.raises(RuntimeError, match="load before training"):
        engine.load_checkpoint(tmp_path / "ckpt", "one")  # would rewind the count under released steps
    with pytest.raises(ValueError, match="entry 'train' is still running"):
        start()  # a second run may not hide under the first one's plan
    # composes with train's whole plan; micro-batches of 1 so that the Poisson draw (expected 12) spans
    # two or more of them unless it holds fewer than 2 rows (odds ~1e-4; at 5 rows a micro-batch about one draw in 50 did not)
    other, _, other_loader, _ = start(name="other", epsilon=8.0, train_micro_batch_size_per_gpu=1)

    # A step that fails half-way is spent, and the engine stops (its buffers hold part of the step).
    calls = {"n": 0}

    def failing(forward, batch):
        calls["n"] += 1
        if calls["n"] == 2:
            raise MemoryError("simulated out-of-memory on the second micro-batch")
        return default_loss(forward, batch)

    other.dp.loss_fn = failing
    first = next(iter(other_loader))
    assert len(first.micro_batches) >= 2
    with pytest.raises(MemoryError):
        other.train_batch(first)
    with pytest.raises(RuntimeError, match="this engine stopped"):
        other.train_batch(first)
    other.finish()
    assert json.loads(ledger.read_text())["phases"]["other"]["mechanisms"][0]["steps"] == 1

    # A backward outside the DP step (e.g. a loss on engine.module): its unclipped gradient would ride
    # on the next step's noise. Refused before the step, and the engine stops.
    third, _, third_loader, _ = start(name="third", epsilon=12.0)
    third_batches = iter(third_loader)
    third.train_batch(next(third_batches))
    stray = next(third_batches)
    # At lr 1000 the first step can saturate the logits, so the loss alone may have an exactly zero gradient
    # (nothing then rides on the noise, and nothing is refused): the sum of the weights makes it non-zero.
    trainable = [p for p in third.module.parameters() if p.requires_grad]
    (default_loss(third.module, stray.micro_batches[0]).sum() + sum(p.sum() for p in trainable)).backward()
    assert any(bool(p.grad.any()) for p in trainable)  # the premise: an unclipped gradient is waiting
    with pytest.raises(RuntimeError, match="holds a gradient before step 2"):
        third.train_batch(stray)
    with pytest.raises(RuntimeError, match="this engine stopped"):
        third.train_batch(stray)
    with pytest.raises(RuntimeError, match="load only before training"):
        third.dp.load_checkpoint(tmp_path / "ckpt", "one")  # DPEngine itself refuses a rewind too

    # The DeepSpeed engine stepped directly: refused, and the DP engine stops for good.
    engine.dp.ds.backward(engine.dp.loss_fn(engine.dp.ds, next(batches).micro_batches[0]).sum())
    with pytest.raises(RuntimeError, match="stepped outside DPEngine.train_step"):
        engine.dp.ds.step()
    with pytest.raises(RuntimeError, match="this engine stopped"):
        engine.train_batch(next(batches))
    engine.finish()
    assert json.loads(ledger.read_text())["phases"]["train"]["mechanisms"][0]["steps"] == 2  # the refused step updated nothing


def test_a_loss_that_mixes_rows_is_refused(tmp_path):
    mixed = lambda forward, batch: default_loss(forward, batch).mean().expand(  # noqa: E731
        batch["labels"].shape[0])
    for clipping in ("per_layer", "flat"):
        engine, _, loader, _ = dist_dpc.initialize(
            model=model(), config=config(train_micro_batch_size_per_gpu=40), training_data=examples(), steps=3,
            loss_fn=mixed, name=clipping,
            privacy=dist_dpc.PrivacyConfig(target_epsilon=8.0, clipping=clipping), ledger=tmp_path / f"{clipping}.json")
        batch = next(iter(loader))
        assert 0 < batch.logical_batch_size < 40  # one micro-batch of 40 rows, most of them padding
        with pytest.raises(ValueError, match="padding row .* the loss function mixes rows"):
            engine.train_batch(batch)


def test_runs_given_the_same_key_never_share_noise_or_batches(tmp_path):
    """A user key (tests, reproductions) is derived per ledger entry: a second run under another name
    (or the next attempt) draws other batches and other noise, never the same draw under another sigma."""
    key = SecretKey.from_seed(1)
    ledger = tmp_path / "ledger.json"
    plans, updates = [], []
    for name in ("a", "b"):
        net = model()
        before = [p.detach().clone() for p in net.parameters()]
        engine, _, loader, _ = dist_dpc.initialize(model=net, config=config(), training_data=examples(), steps=1, key=key,
                                                   name=name, ledger=ledger, privacy=dist_dpc.PrivacyConfig(
                                                       target_epsilon=None, noise_multiplier=1.0))
        plans.append(loader.sampler.plan(0).micro_batches)
        engine.train_batch(next(iter(loader)))
        engine.finish()
        updates.append(torch.cat([(p.detach() - b).flatten() for p, b in zip(net.parameters(), before)]))
    assert plans[0] != plans[1]
    assert float(torch.corrcoef(torch.stack(updates))[0, 1]) < 0.5  # noise-dominated updates, independent draws


def test_a_starting_model_from_an_earlier_dp_run_brings_its_cost(tmp_path):
    """A model saved by a DP run and loaded with from_pretrained: its lineage goes into the new ledger
    before the reservation (the total composes both runs, checked against opacus' PRV); in the same
    ledger nothing is counted twice; a model trained without DP, or a local directory of unknown
    origin, is refused before anything is spent."""
    from opacus.accountants import PRVAccountant
    from transformers import AutoModelForSequenceClassification

    def load(path):  # hub kernels off, as the engine asks (they swap layer forwards on train()/eval())
        return AutoModelForSequenceClassification.from_pretrained(path, use_kernels=False)

    first_ledger = tmp_path / "first.json"
    engine, _, loader, _ = dist_dpc.initialize(model=model(), config=config(), training_data=examples(), steps=5,
                                               privacy=dist_dpc.PrivacyConfig(target_epsilon=4.0), ledger=first_ledger)
    for batch in loader:
        engine.train_batch(batch)
    engine.finish()
    engine.save_pretrained(tmp_path / "dp_model")
    first = json.loads(first_ledger.read_text())["phases"]["train"]["mechanisms"]

    second_ledger = tmp_path / "second.json"
    loaded = load(tmp_path / "dp_model")
    engine2, _, loader2, _ = dist_dpc.initialize(model=loaded, config=config(), training_data=examples(), steps=3,
                                                 privacy=dist_dpc.PrivacyConfig(target_epsilon=8.0), ledger=second_ledger)
    for batch in loader2:
        engine2.train_batch(batch)
    total = engine2.finish()
    phases = json.loads(second_ledger.read_text())["phases"]
    imported = [k for k in phases if k.startswith("imported:")]
    strip = lambda ms: [{k: v for k, v in m.items() if k != "phase"} for m in ms]  # noqa: E731
    assert len(imported) == 1 and strip(phases[imported[0]]["mechanisms"]) == strip(first)
    accountant = PRVAccountant()
    accountant.history = [(m["noise_multiplier"], m["sample_rate"], m["steps"]) for p in phases.values()
                          for m in p["mechanisms"]]
    assert total == pytest.approx(accountant.get_epsilon(delta=json.loads(second_ledger.read_text())["delta"],
                                                         eps_error=0.01), abs=0.05)
    assert total <= 8.0 * (1 + 1e-6)

    # The same ledger: the model's cost is there already, nothing is imported.
    engine3, _, _, _ = dist_dpc.initialize(model=load(tmp_path / "dp_model"),
                                           config=config(), training_data=examples(), steps=2, name="again",
                                           privacy=dist_dpc.PrivacyConfig(target_epsilon=8.0), ledger=first_ledger)
    engine3.finish()
    assert not [k for k in json.loads(first_ledger.read_text())["phases"] if k.startswith("imported:")]

    # Trained without DP: refused. A local directory without lineage: refused unless declared public.
    plain = model()
    plain.save_pretrained(tmp_path / "unknown")
    (tmp_path / "nodp").mkdir()
    plain.save_pretrained(tmp_path / "nodp")
    (tmp_path / "nodp" / "privacy_lineage.json").write_text(json.dumps({"format": 1, "private": False, "phase": "x"}))
    for where, message in (("nodp", "WITHOUT differential privacy"), ("unknown", "privacy.public_model_dirs")):
        ledger = tmp_path / f"{where}.json"
        with pytest.raises(ValueError, match=message):
            dist_dpc.initialize(model=load(tmp_path / where),
                                config=config(), training_data=examples(), steps=2, ledger=ledger,
                                privacy=dist_dpc.PrivacyConfig(target_epsilon=4.0))
        assert not json.loads(ledger.read_text()).get("phases") if ledger.exists() else True
    engine4, _, _, _ = dist_dpc.initialize(
        model=load(tmp_path / "unknown"), config=config(),
        training_data=examples(), steps=2, ledger=tmp_path / "declared.json",
        privacy=dist_dpc.PrivacyConfig(target_epsilon=4.0, public_model_dirs=[str(tmp_path / "unknown")]))
    engine4.finish()
    assert any(k.startswith("public:") for k in json.loads((tmp_path / "declared.json").read_text())["phases"])


def _worker(tmp_path, ledger, mode: str):
    import os
    import sys

    return [sys.executable, "-m", "tests.pipeline.api_resume_worker", str(ledger), str(tmp_path / "ckpt"), str(tmp_path),
            mode], {**{k: v for k, v in os.environ.items()  # this process's rendezvous is not the child's
                       if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")},
                    "PYTHONPATH": str(ROOT)}


def _crashed_run(tmp_path, ledger, mode: str = "plain"):
    """A real process that trains 3 of 6 planned steps, checkpoints at step 2 and dies without finish()."""
    cmd, environment = _worker(tmp_path, ledger, mode)
    proc = subprocess.run(cmd, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3, proc.stderr[-3000:]
    entry = json.loads(ledger.read_text())["phases"]["train"]
    assert entry["status"] == "running" and entry["mechanisms"][0]["steps"] == 6  # the whole plan stays counted
    return entry


def _resume(ledger, ckpt, steps=6, tag=None, key=None, **privacy):
    return dist_dpc.initialize(model=model(), config=config(), training_data=examples(), steps=steps, ledger=ledger,
                               privacy=dist_dpc.PrivacyConfig(target_epsilon=4.0, max_effective_noise=None, **privacy),
                               resume_from=ckpt, resume_tag=tag, key=key)


def test_a_killed_run_resumes_its_own_ledger_entry_from_its_checkpoint(tmp_path):
    """The entry of a run killed after its checkpoint is continued, not duplicated: same sigma, the
    weights of the checkpoint, fresh noise even under the same key=, the remaining steps, and at
    finish() the entry counts the 6 steps of the trajectory once -- the ledger an uninterrupted run
    of 6 steps leaves."""
    from tests.pipeline.api_resume_worker import KEY_SEED

    ledger = tmp_path / "ledger.json"
    crashed = _crashed_run(tmp_path, ledger)
    engine, _, loader, _ = _resume(ledger, tmp_path / "ckpt", key=SecretKey.from_seed(KEY_SEED))
    assert engine.steps_done == 2 and len(loader) == 4 and engine.noise_multiplier == \
        crashed["reservation"]["noise_multiplier"]
    at_two, at_three = torch.load(tmp_path / "at_step2.pt"), torch.load(tmp_path / "at_step3.pt")
    for name, value in engine.module.named_parameters():
        torch.testing.assert_close(value.detach(), at_two[name], rtol=0, atol=0, msg=name)
    with pytest.raises(ValueError, match="still running in this process"):
        _resume(ledger, tmp_path / "ckpt")  # two live runs in one entry would count as one trajectory
    with pytest.raises(RuntimeError, match="already loaded a checkpoint"):
        engine.load_checkpoint(tmp_path / "ckpt", "two")  # a second load could rewind past later outputs
    batches = iter(loader)
    engine.train_batch(next(batches))
    # The killed run's step 3 was drawn from the same key= and the same state: the resume's run number
    # keys fresh noise and batches, so step 3 is not a replay (a replay under other settings, e.g.
    # another C, would cancel the noise between the two).
    assert any(not torch.allclose(p.detach(), at_three[n]) for n, p in engine.module.named_parameters())
    for batch in batches:
        engine.train_batch(batch)
    epsilon = engine.finish()
    phases = json.loads(ledger.read_text())["phases"]
    assert list(phases) == ["train"] and phases["train"]["status"] == "completed" and phases["train"]["runs"] == 2

    uninterrupted = tmp_path / "uninterrupted.json"
    other, _, other_loader, _ = dist_dpc.initialize(
        model=model(), config=config(), training_data=examples(), steps=6, ledger=uninterrupted,
        privacy=dist_dpc.PrivacyConfig(target_epsilon=4.0, max_effective_noise=None))
    for batch in other_loader:
        other.train_batch(batch)
    assert other.finish() == pytest.approx(epsilon, rel=1e-9)
    reference = json.loads(uninterrupted.read_text())["phases"]["train"]
    assert phases["train"]["mechanisms"] == reference["mechanisms"]  # 6 steps at the same sigma, once
    with pytest.raises(ValueError, match="is completed"):
        _resume(ledger, tmp_path / "ckpt")  # a finished entry is not reopened


def test_a_resume_on_a_ledger_whose_run_count_was_reset_is_refused(tmp_path):
    """An older dist-dpc (or a restored copy) rewriting the ledger drops the entry's run count; the
    next run would be numbered 1 again and draw the killed run's noise and batches under the same key=.
    The checkpoint records its run's number: a resume numbered no higher is refused."""
    ledger = tmp_path / "ledger.json"
    _crashed_run(tmp_path, ledger)
    data = json.loads(ledger.read_text())
    del data["phases"]["train"]["runs"]
    ledger.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="run count was reset"):
        _resume(ledger, tmp_path / "ckpt")


def test_resume_waits_for_the_run_that_holds_the_entry(tmp_path):
    """A resume while the first run's process is alive is refused (it could still train and save);
    once the process is gone the OS drops its lock and the same resume goes ahead."""
    ledger = tmp_path / "ledger.json"
    cmd, environment = _worker(tmp_path, ledger, "hold")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=environment, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        lines = iter(proc.stdout.readline, "")
        assert any(line.strip() == "READY" for line in lines)  # other lines: DeepSpeed's own messages
        with pytest.raises(ValueError, match="still running in another process"):
            _resume(ledger, tmp_path / "ckpt")
    finally:
        proc.kill()
        proc.wait()
    engine, _, loader, _ = _resume(ledger, tmp_path / "ckpt")
    assert engine.steps_done == 2 and len(loader) == 4


def test_resume_is_refused_where_it_would_undercount(tmp_path):
    """A model or a checkpoint written after the checkpoint resumed from (step 3 > 2): resuming at 2
    would count steps 3.. once for two trajectories. Another plan, sigma, C or ledger, or a checkpoint
    whose record does not match what it loads: refused, the entry's count untouched."""
    def counted(path):
        return {name: e["mechanisms"] for name, e in json.loads(path.read_text())["phases"].items()}

    for mode in ("model", "checkpoint"):
        ledger = tmp_path / f"{mode}.json"
        _crashed_run(tmp_path, ledger, mode)
        before = counted(ledger)
        with pytest.raises(ValueError, match="after 3 steps, later than this checkpoint"):
            _resume(ledger, tmp_path / "ckpt", tag="two")
        assert counted(ledger) == before

    ledger2 = tmp_path / "ledger2.json"
    _crashed_run(tmp_path, ledger2)
    before = counted(ledger2)
    with pytest.raises(ValueError, match="planned 6 steps"):
        _resume(ledger2, tmp_path / "ckpt", steps=8)
    with pytest.raises(ValueError, match="resume with the privacy settings of that run"):
        _resume(ledger2, tmp_path / "ckpt", noise_multiplier=5.0)
    with pytest.raises(ValueError, match="max_grad_norm=1.0, this one 2.0"):
        _resume(ledger2, tmp_path / "ckpt", max_grad_norm=2.0)
    with pytest.raises(ValueError, match="belongs to another ledger"):
        _resume(tmp_path / "fresh.json", tmp_path / "ckpt")
    record = tmp_path / "ckpt" / "two" / "dist_dpc_entry.json"
    record.write_text(json.dumps({**json.loads(record.read_text()), "step": 3}))
    with pytest.raises(RuntimeError, match="the checkpoint is inconsistent"):
        _resume(ledger2, tmp_path / "ckpt")
    assert counted(ledger2) == before
