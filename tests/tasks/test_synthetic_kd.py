"""DP distillation through synthetic text (Flemings & Annavaram 2024): the token KD loss against a
hand computation with masking, the hidden-state projection when widths differ, the histogram phase's
refusals and allocation, the refusals of a student phase whose inputs are (or may be) private data,
and the chain teacher -> histogram -> generate -> distill_synthetic -> eval -> export through `dpc
pipeline`, whose ledger is opacus' PRV over the teacher's DP-SGD and the histogram and nothing else."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from dist_dpc.compress.distill import SyntheticKDObjective, token_kd_loss, token_kd_terms
from tests.pipeline.test_phases import opacus_prv_epsilon
from tests.pipeline.test_train import ROOT, dpc
from tests.tasks.test_causal_lm import write_yelp


def _softmax(xs, t):
    m = max(x / t for x in xs)
    e = [math.exp(x / t - m) for x in xs]
    return [v / sum(e) for v in e]


def test_token_kd_loss_matches_a_hand_computation_with_masking():
    g = torch.Generator().manual_seed(0)
    B, L, V, alpha, T = 2, 5, 4, 0.4, 2.0
    s, t = torch.randn(B, L, V, generator=g), torch.randn(B, L, V, generator=g)
    labels = torch.tensor([[-100, -100, 1, 3, -100],    # prefix, two text tokens, padding
                           [-100, 2, 0, 1, 2]])
    per_token, mask = token_kd_terms(s, t, labels, alpha, T)
    expected_rows = []
    for b in range(B):
        row = []
        for pos in range(L - 1):  # position pos predicts labels[pos + 1]
            target = int(labels[b, pos + 1])
            if target == -100:
                continue
            p_s1, p_s, p_t = _softmax(s[b, pos].tolist(), 1.0), _softmax(s[b, pos].tolist(), T), _softmax(t[b, pos].tolist(), T)
            ce = -math.log(p_s1[target])
            kl = sum(pt * (math.log(pt) - math.log(ps)) for pt, ps in zip(p_t, p_s))
            row.append((1 - alpha) * ce + alpha * T * T * kl)
        expected_rows.append(row)
    assert mask.tolist() == [[False, True, True, False], [True, True, True, True]]
    assert float(per_token.sum()) == pytest.approx(sum(map(sum, expected_rows)), rel=1e-5)
    assert float(per_token[0, 3]) == 0.0 and float(per_token[0, 0]) == 0.0  # masked positions contribute nothing
    per_sample = token_kd_loss(s, t, labels, alpha, T)
    assert per_sample.tolist() == pytest.approx([sum(r) / len(r) for r in expected_rows], rel=1e-5)
    # alpha 0 is plain next-token cross-entropy
    ce_only = token_kd_loss(s, t, labels, 0.0, T)
    reference = torch.nn.functional.cross_entropy(s[:, :-1].transpose(1, 2), labels[:, 1:], ignore_index=-100,
                                                  reduction="none").sum(1) / (labels[:, 1:] != -100).sum(1)
    assert torch.allclose(ce_only, reference, atol=1e-6)


def _tiny_llama(hidden: int, layers: int = 2, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=hidden, intermediate_size=2 * hidden,
                                        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=64))


def test_hidden_state_term_goes_through_a_learned_projection_when_widths_differ():
    teacher, student = _tiny_llama(32, seed=0).eval(), _tiny_llama(16, layers=1, seed=1).eval()
    ids = torch.randint(0, 64, (3, 10), generator=torch.Generator().manual_seed(2))
    labels = ids.clone()
    labels[:, :3] = -100  # control codes
    labels[2, 7:] = -100  # padding
    attention = torch.ones_like(ids)
    attention[2, 7:] = 0
    batch = {"input_ids": ids, "attention_mask": attention, "labels": labels}
    beta = 0.5
    with_hidden = SyntheticKDObjective(student, teacher, alpha=0.4, temperature=1.0, hidden_weight=beta)
    assert isinstance(with_hidden.projection, torch.nn.Linear) and with_hidden.projection.weight.shape == (32, 16)
    assert not any(p is q for p in with_hidden.parameters() for q in teacher.parameters())  # the teacher is not trained
    total, tokens = with_hidden(batch)
    without, tokens0 = SyntheticKDObjective(student, teacher, alpha=0.4, temperature=1.0)(batch)
    # The difference is beta * sum over counted positions of mean_d (P h_s - h_t)^2, computed here by hand.
    with torch.no_grad():
        h_s = student(input_ids=ids, attention_mask=attention, output_hidden_states=True).hidden_states[-1]
        h_t = teacher(input_ids=ids, attention_mask=attention, output_hidden_states=True).hidden_states[-1]
        projected = h_s @ with_hidden.projection.weight.T + with_hidden.projection.bias
        expected = 0.0
        for b in range(3):
            for pos in range(9):
                if labels[b, pos + 1] != -100:
                    expected += float(((projected[b, pos] - h_t[b, pos]) ** 2).mean())
    assert int(tokens) == int(tokens0) == 7 + 7 + 4
    assert float((total - without).detach()) == pytest.approx(beta * expected, rel=1e-4)
    total.backward()
    assert with_hidden.projection.weight.grad is not None and with_hidden.projection.weight.grad.abs().sum() > 0
    same = SyntheticKDObjective(_tiny_llama(32, layers=1), teacher, alpha=0.4, temperature=1.0, hidden_weight=beta)
    assert isinstance(same.projection, torch.nn.Identity)


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """One tree through the whole synthetic-text chain on tiny-llama (seconds)."""
    root = tmp_path_factory.mktemp("skd")
    write_yelp(root / "train.csv", 200, 0, "train")
    write_yelp(root / "test.csv", 20, 1, "test")
    args = [str(ROOT / "configs" / "debug_lm.yaml"), f"run.output_dir={root}", "data.task=yelp",
            f"data.train_file={root / 'train.csv'}", f"data.eval_file={root / 'test.csv'}", "data.max_length=96",
            "train.max_steps=2"]
    chain_args = [*args, "run.name=skd", "pipeline.phases=[teacher, histogram, generate, distill_synthetic, eval, export]",
                  "pipeline.budget_split={teacher: 0.9, histogram: 0.1}", "histogram.samples=30",
                  "generate.batch_size=4", "generate.max_new_tokens=12", "distill_synthetic.epochs=2",
                  "distill_synthetic.batch_size=4", "distill_synthetic.eval_every=3", "distill_synthetic.holdout_fraction=0.1"]
    proc = dpc(["pipeline", *chain_args], timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return root, args, chain_args


@pytest.mark.timeout(900)
def test_the_chain_spends_only_on_the_teacher_and_the_histogram(chain):
    root, _, _ = chain
    run = root / "skd"
    ledger = json.loads((run / "eval" / "results.json").read_text())["ledger"]  # the ledger with its totals
    assert list(ledger["phases"]) == ["teacher", "histogram"]  # nothing for generate or the student
    mechanisms = [m for entry in ledger["phases"].values() for m in entry["mechanisms"]]
    histogram = ledger["phases"]["histogram"]["mechanisms"]
    assert len(histogram) == 1 and histogram[0]["sample_rate"] == 1.0 and histogram[0]["steps"] == 1
    assert ledger["total_epsilon_prv"] == pytest.approx(opacus_prv_epsilon(mechanisms, ledger["delta"]), rel=0.02)
    assert ledger["total_epsilon_prv"] <= 8.0 * 1.001
    # The allocation: every public category (10 x 5), non-negative counts summing to histogram.samples.
    hist = json.loads((run / "histogram" / "results.json").read_text())
    assert len(hist["allocation"]) == 50 and sum(hist["allocation"]) == 30 and min(hist["allocation"]) >= 0
    assert "counts" not in hist and all(c >= 0 for c in hist["noisy_counts"])
    plan = json.loads((run / "generate" / "plan.json").read_text())
    assert plan["samples"] == 30  # generate sampled by the allocation
    student = json.loads((run / "distill_synthetic" / "results.json").read_text())
    assert student["epsilon"] == pytest.approx(ledger["total_epsilon_prv"]) and student["spent"] == 0.0
    assert student["layer_parameters"] * 2 <= student["teacher_layer_parameters"]
    assert student["synthetic_train"] + student["synthetic_holdout"] == 30 and student["synthetic_holdout"] == 3
    rows = {r["phase"]: r for r in json.loads((run / "eval" / "results.json").read_text())["models"]}
    assert set(rows) == {"teacher", "distill_synthetic"}
    assert rows["distill_synthetic"]["metrics"]["validation"]["perplexity"] > 1  # on the real test split
    card = (run / "export" / "model" / "README.md").read_text()
    assert "distill_synthetic" in card and f"{ledger['total_epsilon_prv']:.3f}" in card
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(str(run / "export" / "model"))
    assert exported.config.num_hidden_layers == 1
    report = dpc(["report", str(run)])
    assert report.returncode == 0, report.stderr[-2000:]
    text = (run / "report" / "privacy_report.md").read_text()
    assert "| histogram | completed | none (every record, q = 1) |" in text
    assert "| distill_synthetic | done | post-processing |" in text and "| generate | done | post-processing |" in text


@pytest.mark.timeout(600)
def test_student_phase_refuses_private_or_unfinished_inputs(chain, tmp_path):
    root, args, _ = chain
    # the private training file itself
    proc = dpc(["distill_synthetic", *args, "run.name=other0", f"distill_synthetic.samples={root / 'train.csv'}"])
    assert proc.returncode == 2 and "is the private data" in proc.stderr, proc.stderr[-2000:]
    # samples from a model without DP: the same files with the summary saying so
    fake = tmp_path / "gen"
    shutil.copytree(root / "skd" / "generate", fake)
    summary = json.loads((fake / "summary.json").read_text())
    (fake / "summary.json").write_text(json.dumps({**summary, "private": False}))
    proc = dpc(["distill_synthetic", *args, "run.name=other", f"distill_synthetic.samples={fake}"])
    assert proc.returncode == 2 and "without a DP guarantee" in proc.stderr, proc.stderr[-2000:]
    # a generation with a failed shard: the error names it
    broken = tmp_path / "broken"
    shutil.copytree(root / "skd" / "generate", broken)
    (broken / "samples.jsonl").unlink()
    (broken / "batches" / "batch-000003.jsonl").unlink()
    proc = dpc(["distill_synthetic", *args, "run.name=other2", f"distill_synthetic.samples={broken}",
                "generate.shards=2"])
    assert proc.returncode == 2 and "shard(s) [1]" in proc.stderr, proc.stderr[-2000:]
    # a teacher changed since it wrote the samples (retrained): its fingerprint no longer matches
    moved = tmp_path / "moved"
    shutil.copytree(root / "skd" / "generate", moved)
    plan = json.loads((moved / "plan.json").read_text())
    (moved / "plan.json").write_text(json.dumps({**plan, "source_fingerprint": "0" * 64}))
    proc = dpc(["distill_synthetic", *args, "run.name=other4", f"distill_synthetic.samples={moved}"])
    assert proc.returncode == 2 and "has changed since" in proc.stderr, proc.stderr[-2000:]
    # a student with another tokenizer
    proc = dpc(["distill_synthetic", *args, "run.name=other3", f"distill_synthetic.samples={root / 'skd' / 'generate'}",
                "distill_synthetic.student=minilm"])
    assert proc.returncode == 2 and "another tokenizer" in proc.stderr, proc.stderr[-2000:]


def test_histogram_refusals_name_the_field(tmp_path):
    write_yelp(tmp_path / "train.csv", 40, 0, "train")
    common = [str(ROOT / "configs" / "debug_lm.yaml"), f"run.output_dir={tmp_path}", "data.task=yelp",
              f"data.train_file={tmp_path / 'train.csv'}", "pipeline.phases=[histogram]", "pipeline.budget_split={}"]
    proc = dpc(["histogram", *common, "data.control_code_columns=[]"])
    assert proc.returncode == 2 and "no control codes" in proc.stderr
    proc = dpc(["histogram", *common, "data.task=csv", "data.control_code_columns=[label1]"])
    assert proc.returncode == 2 and "histogram.code_values is required" in proc.stderr
    proc = dpc(["histogram", *common, "histogram.code_values=[[a, b]]"])
    assert proc.returncode == 2 and "1 lists for 2 control-code columns" in proc.stderr
    # refused before the teacher spends: prompts that would leave the allocation unused
    proc = dpc(["pipeline", *common, "run.name=conflict", "pipeline.phases=[teacher, histogram, generate]",
                "generate.prompts={'': 4}"])
    assert proc.returncode == 2 and "ignore the DP allocation" in proc.stderr
    assert not (tmp_path / "conflict" / "teacher").exists()
    # run ahead of the teacher listed before it, its cumulative share would take the teacher's too
    proc = dpc(["histogram", *common, "run.name=early", "pipeline.phases=[teacher, histogram]",
                "pipeline.budget_split={teacher: 0.9, histogram: 0.1}"])
    assert proc.returncode == 2 and "have not run in this tree" in proc.stderr, proc.stderr[-2000:]
    proc = dpc(["histogram", str(ROOT / "configs" / "debug.yaml"), f"run.output_dir={tmp_path}"])
    assert proc.returncode == 2 and "synthetic-text path of a causal LM" in proc.stderr
    assert not any((tmp_path / "debug-lm").glob("privacy_ledger.json"))


def test_dpkd_loss_of_a_causal_lm_is_per_sample():
    """DPKD for causal LMs (the paper's baseline) clips DistillationLoss per sample: each sample's loss
    must depend on that sample alone (the teacher on the same micro-batch, padding masked)."""
    from dist_dpc.compress.distill import DistillationLoss

    teacher, student = _tiny_llama(32, seed=0).eval(), _tiny_llama(32, layers=1, seed=1).eval()
    loss = DistillationLoss(teacher, alpha=0.5, temperature=2.0, hidden_weight=0.3, layer_map=[1], token_level=True)
    ids = torch.randint(0, 64, (3, 8), generator=torch.Generator().manual_seed(3))
    labels, attention = ids.clone(), torch.ones_like(ids)
    labels[:, :2] = -100
    labels[1, 5:], attention[1, 5:] = -100, 0
    batch = {"input_ids": ids, "attention_mask": attention, "labels": labels}
    together = loss(student, batch)
    alone = torch.cat([loss(student, {k: v[i:i + 1] for k, v in batch.items()}) for i in range(3)])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # alpha 0 and no hidden term: the engine's plain LM loss
        plain = DistillationLoss(teacher, alpha=0.0, temperature=2.0, token_level=True)(student, batch)
        from dist_dpc.engine.losses import causal_lm_loss

        torch.testing.assert_close(plain, causal_lm_loss(student, batch))


@pytest.mark.timeout(600)
def test_dpkd_baseline_of_a_causal_lm_runs_in_one_tree(chain):
    root, args, _ = chain
    proc = dpc(["pipeline", *args, "run.name=dpkd", "pipeline.phases=[teacher, distill, eval]",
                "pipeline.budget_split={teacher: 0.5, distill: 0.5}", "distill.alpha=0.4", "distill.temperature=1.0"],
               timeout=500)  # the default student: every weight but embeddings, RMSNorms included
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((root / "dpkd" / "eval" / "results.json").read_text())
    assert list(results["ledger"]["phases"]) == ["teacher", "distill"]
    assert results["ledger"]["total_epsilon_prv"] == pytest.approx(8.0, rel=0.01)
    rows = {r["phase"]: r for r in results["models"]}
    assert rows["distill"]["layers"] == 1 and rows["distill"]["metrics"]["validation"]["perplexity"] > 1


@pytest.mark.timeout(600)
def test_a_student_in_another_tree_imports_the_samples_whole_cost(chain):
    """The no-KD baseline reads the chain's samples from its own tree: their lineage (the generating
    tree's teacher and histogram) comes into its ledger once; the teacher is not counted twice."""
    root, args, _ = chain
    proc = dpc(["pipeline", *args, "run.name=nokd", "pipeline.phases=[distill_synthetic, eval]",
                "pipeline.budget_split={}", f"distill_synthetic.samples={root / 'skd' / 'generate'}",
                "distill_synthetic.kd_weight=0", "distill_synthetic.epochs=1", "distill_synthetic.batch_size=4",
                "distill_synthetic.holdout_fraction=0.1"], timeout=500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ours = json.loads((root / "nokd" / "eval" / "results.json").read_text())["ledger"]
    theirs = json.loads((root / "skd" / "eval" / "results.json").read_text())["ledger"]
    assert list(ours["phases"]) == [f"imported:{(root / 'skd' / 'generate').resolve()}"]
    assert ours["total_epsilon_prv"] == pytest.approx(theirs["total_epsilon_prv"], rel=1e-9)


def _student_weights(tree):
    from safetensors.torch import load_file

    return load_file(tree / "distill_synthetic" / "model" / "model.safetensors")


@pytest.mark.timeout(1200)
def test_the_student_shards_like_the_dp_phases_and_resumes_at_another_world_size(chain, tmp_path):
    """distill_synthetic under DeepSpeed (issue 16, item 4): one process at ZeRO 0 and two ranks at ZeRO
    0, 1, 2 and 3 (at 3 student and teacher built partitioned) train the same student from the same
    samples. Batches of 5 over 2 ranks in micro-batches of 2 leave rank 1 a padding micro-batch
    every step, so the token normalisation and the padding are both checked. Then the 2-rank ZeRO-3
    run's checkpoint pointer is moved back to step 4 (as a kill after that save would leave it, but
    with later tags and a later best/ on disk) and the run resumes in one process, through DeepSpeed's
    universal format, to the same student."""
    from safetensors.torch import load_file

    from tests.engine.launch import torchrun
    from tests.pipeline.test_zero3_chain import assert_built_partitioned

    root, args, _ = chain
    common = [*args, "pipeline.budget_split={}", f"distill_synthetic.samples={root / 'skd' / 'generate'}",
              "distill_synthetic.epochs=2", "distill_synthetic.batch_size=5", "train.micro_batch_size=2",
              "distill_synthetic.eval_every=2", "distill_synthetic.patience=100", "distill_synthetic.lr=3e-3",
              "distill_synthetic.hidden_weight=0.2", "distill_synthetic.holdout_fraction=0.1",
              "train.keep_checkpoints=20", "wandb.mode=disabled"]
    one = dpc(["distill_synthetic", *common, "run.name=w1", "train.zero_stage=0"], timeout=600)
    assert one.returncode == 0, one.stdout[-3000:] + one.stderr[-3000:]
    outs = {}
    for stage in (0, 1, 2, 3):
        outs[stage] = torchrun("dist_dpc/cli.py", ["distill_synthetic", *common, f"run.name=w2z{stage}",
                                                   f"train.zero_stage={stage}"], world_size=2, timeout=600).stdout
        assert_built_partitioned(outs[stage], stage, ["distill_synthetic] teacher", "distill_synthetic] student"])
    assert "teacher partitioned over 2 ranks (ZeRO 3)" in outs[3]
    reference = _student_weights(root / "w1")
    initial = load_file(root / "w1" / "distill_synthetic" / "student_init" / "model.safetensors")
    assert any(not torch.equal(reference[k], initial[k]) for k in reference)  # it trained: the comparison has teeth
    results = {name: json.loads((root / name / "distill_synthetic" / "results.json").read_text())
               for name in ("w1", "w2z0", "w2z1", "w2z2", "w2z3")}
    assert results["w2z3"]["zero_stage"] == 3 and results["w2z3"]["world_size"] == 2
    for name in ("w2z0", "w2z1", "w2z2", "w2z3"):
        weights = _student_weights(root / name)
        assert sorted(weights) == sorted(reference)
        for key in reference:
            torch.testing.assert_close(weights[key], reference[key], rtol=1e-4, atol=2e-5, msg=f"{name}: {key}")
        assert results[name]["steps"] == results["w1"]["steps"] == 12
        assert results[name]["metrics"]["synthetic_holdout"]["loss"] == pytest.approx(
            results["w1"]["metrics"]["synthetic_holdout"]["loss"], rel=1e-4)

    # Rewind the 2-rank ZeRO-3 tree to its step-4 checkpoint, resume on one rank.
    phase = root / "w2z3" / "distill_synthetic"
    tags = sorted(p.name for p in (phase / "checkpoints").glob("step*") if p.is_dir())
    assert "step00000004" in tags and tags[-1] == "step00000012", tags
    (phase / "checkpoints" / "latest_complete").write_text("step00000004")
    (phase / "results.json").unlink()
    shutil.rmtree(phase / "model")
    resumed = dpc(["distill_synthetic", *common, "run.name=w2z3", "train.zero_stage=3"], timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resumed at step 4/12" in resumed.stdout + resumed.stderr
    # best/ held the finished run's best model, not step 4's: the resume re-saves it from the checkpoint
    # (what a kill between the checkpoint and best/ needs too).
    assert "best/ re-saved from the checkpoint of step 4" in resumed.stdout + resumed.stderr
    assert (phase / "checkpoints" / "step00000004-universal").is_dir()  # re-partitioned for world 1
    weights = _student_weights(root / "w2z3")
    for key in reference:
        torch.testing.assert_close(weights[key], reference[key], rtol=1e-4, atol=2e-5, msg=f"resumed: {key}")


@pytest.mark.timeout(900)
@pytest.mark.parametrize("stage", [2, 3])
def test_a_narrower_student_trains_in_bf16_on_two_ranks(chain, tmp_path, stage):
    """A pre-trained student of half the teacher's width (the hidden-state term through the learned
    projection, which DeepSpeed casts to bf16 with the student) at ZeRO 2 and 3 in bf16 on 2 ranks,
    the teacher in bf16 too (whole at ZeRO 2, partitioned at 3): it trains (its held-out objective
    falls epoch by epoch), and the saved model is the narrow student alone (no projection), loadable
    by transformers."""
    import re

    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from tests.engine.launch import torchrun

    root, args, _ = chain
    teacher_dir = root / "skd" / "teacher" / "model"
    config = AutoConfig.from_pretrained(teacher_dir)
    config.update({"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                   "num_key_value_heads": 1})
    torch.manual_seed(0)
    narrow = tmp_path / "narrow"
    AutoModelForCausalLM.from_config(config).save_pretrained(narrow)
    AutoTokenizer.from_pretrained(teacher_dir).save_pretrained(narrow)
    common = [*args, "pipeline.budget_split={}", f"distill_synthetic.samples={root / 'skd' / 'generate'}",
              f"distill_synthetic.student={narrow}", f"privacy.public_model_dirs=[{narrow}]",
              "distill_synthetic.epochs=3", "distill_synthetic.batch_size=6", "train.micro_batch_size=2",
              "distill_synthetic.eval_every=100", "distill_synthetic.lr=1e-2", "distill_synthetic.hidden_weight=0.5",
              "distill_synthetic.holdout_fraction=0.1", "wandb.mode=disabled", f"train.zero_stage={stage}",
              "train.bf16=true"]
    out = torchrun("dist_dpc/cli.py", ["distill_synthetic", *common, f"run.name=narrow-bf16-z{stage}"], world_size=2,
                   timeout=600).stdout
    assert "projected" in out and f"ZeRO stage {stage}" in out
    assert ("teacher whole on every rank" if stage == 2 else "teacher partitioned over 2 ranks") in out
    assert re.search(r"teacher (whole|partitioned).*torch\.bfloat16\)", out)  # the teacher's dtype
    phase = root / f"narrow-bf16-z{stage}" / "distill_synthetic"
    results = json.loads((phase / "results.json").read_text())
    held = results["metrics"]["synthetic_holdout"]
    assert math.isfinite(held["loss"]) and results["zero_stage"] == stage and results["skipped_steps"] == 0
    saved = AutoModelForCausalLM.from_pretrained(phase / "model")
    assert saved.config.hidden_size == 16 and not any("projection" in n for n, _ in saved.named_parameters())
    # One evaluation per epoch (eval_every is larger): the held-out objective falls from epoch 1 to 3.
    losses = [float(x) for x in re.findall(r"\[distill_synthetic\] step \d+/\d+: held-out loss ([\d.]+)", out)]
    assert len(losses) == 3 and losses[-1] < losses[0] - 0.05, losses
    assert held["loss"] == pytest.approx(min(losses), abs=1e-4)


@pytest.mark.timeout(900)
def test_a_killed_overwrite_attempt_resumes_instead_of_starting_over(chain):
    """run.overwrite=true over a finished student starts a new attempt; killed (-9) after its third
    checkpoint, the same command again resumes that attempt (before, it wiped its own checkpoints and
    started from step 0 again, because the finished run's results.json was still there)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.pipeline.test_train import env

    root, args, _ = chain
    common = ["distill_synthetic", *args, "pipeline.budget_split={}", "run.name=again",
              f"distill_synthetic.samples={root / 'skd' / 'generate'}", "distill_synthetic.batch_size=3",
              "train.micro_batch_size=3", "distill_synthetic.eval_every=1", "distill_synthetic.patience=1000",
              "distill_synthetic.holdout_fraction=0.1", "wandb.mode=disabled", "distill_synthetic.epochs=6"]
    first = dpc(common, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    phase = root / "again" / "distill_synthetic"
    old_results = (phase / "results.json").read_text()
    proc = subprocess.Popen([sys.executable, "-m", "dist_dpc.cli", *common, "run.overwrite=true"], env=env(), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    pointer = phase / "checkpoints" / "latest_complete"
    deadline = time.time() + 300
    # The new attempt has begun once the finished run's results are gone; then wait for its third checkpoint.
    while time.time() < deadline and not (not (phase / "results.json").is_file() and pointer.is_file()
                                          and pointer.read_text().strip() >= "step00000003"):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (phase / "results.json").is_file(), "the attempt finished before it could be killed"
    resumed = dpc([*common, "run.overwrite=true"], timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed at step" in resumed.stdout + resumed.stderr
    # Nothing here is random once the seed is fixed: the resumed attempt ends where the first run ended.
    assert json.loads((phase / "results.json").read_text())["metrics"] == json.loads(old_results)["metrics"]
