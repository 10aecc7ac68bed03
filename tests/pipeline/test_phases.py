"""The compression pipeline end to end on a debug model, through the real CLI: teacher -> DPKD ->
DPIMP -> eval -> export, one ledger composed like opacus' PRV, resume, refusals, imported teachers."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from dist_dpc.compress.distill import every_other_layer
from dist_dpc.privacy.accounting import Mechanism, compute_epsilon
from tests.pipeline.test_train import ROOT, dpc

TINY = ["model.name=tiny-bert", "model.dropout=0", "data.synthetic_size=240", "data.max_length=16",
        "train.batch_size=24", "train.micro_batch_size=12", "train.lr=5e-3",
        "privacy.randomness=insecure_reproducible", "privacy.noise_seed=11",
        "train.max_steps=6", "train.log_every=2"]
CONFIG = str(ROOT / "configs" / "debug.yaml")


def opacus_prv_epsilon(mechanisms: list[dict], delta: float) -> float:
    from opacus.accountants import PRVAccountant

    acc = PRVAccountant()
    acc.history = [(m["noise_multiplier"], m["sample_rate"], m["steps"]) for m in mechanisms]
    return acc.get_epsilon(delta=delta, eps_error=0.01)


def ok(proc):
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


@pytest.mark.timeout(900)
def test_pipeline_ledger_masks_export_and_resume(tmp_path):
    args = [CONFIG, f"run.output_dir={tmp_path}", "run.name=p", *TINY, "privacy.target_epsilon=6",
            "pipeline.budget_split={teacher: 0.5, distill: 0.25, prune: 0.25}", "prune.rounds=2",
            "train.checkpoint_every=2"]
    proc = ok(dpc(["pipeline", *args], timeout=600))
    run = tmp_path / "p"
    ledger = json.loads((run / "privacy_ledger.json").read_text())
    assert list(ledger["phases"]) == ["teacher", "distill", "prune"]
    assert all(e["status"] == "completed" for e in ledger["phases"].values())
    assert [m["steps"] for e in ledger["phases"].values() for m in e["mechanisms"]] == [6, 6, 12]
    mechs = [m for e in ledger["phases"].values() for m in e["mechanisms"]]
    results = {p: json.loads((run / p / "results.json").read_text()) for p in ("teacher", "distill", "prune")}
    # Each phase was calibrated to its cumulative share of epsilon = 6: 3, 4.5, then 6.
    for phase, target in (("teacher", 3.0), ("distill", 4.5), ("prune", 6.0)):
        assert target * 0.99 <= results[phase]["epsilon"] <= target * (1 + 1e-6), (phase, results[phase]["epsilon"])
    # The total is a heterogeneous composition: equal to opacus' PRV accountant over the same list,
    # and clearly below the sum of what each phase would cost alone.
    delta = ledger["delta"]
    total = compute_epsilon([Mechanism(m["noise_multiplier"], m["sample_rate"], m["steps"]) for m in mechs], delta)
    assert results["prune"]["epsilon"] == pytest.approx(total, rel=1e-6)
    assert total == pytest.approx(opacus_prv_epsilon(mechs, delta), rel=0.02)
    alone = sum(opacus_prv_epsilon([m], delta) for m in mechs)
    assert total < 0.9 * alone
    assert "privacy ledger" in proc.stdout and "PRV composition of all phases" in proc.stdout
    # phase_seconds is the whole phase (loading, head_init, both pruning rounds); train_seconds only
    # the DP-SGD steps (for prune: its last round's).
    assert all(r["phase_seconds"] > r["train_seconds"] > 0 for r in results.values())

    # DPKD student: half the teacher's layers, initialised from its layers 0 (every other one).
    teacher_cfg = json.loads((run / "teacher" / "model" / "config.json").read_text())
    student_cfg = json.loads((run / "distill" / "model" / "config.json").read_text())
    assert (teacher_cfg["num_hidden_layers"], student_cfg["num_hidden_layers"]) == (2, 1)
    assert results["distill"]["layer_map"] == every_other_layer(2)

    # Pruned weights are exactly zero in the final model, at the last round's masks, 50 % of them.
    masks = torch.load(run / "prune" / "round2" / "masks.pt")
    weights = load_file(run / "prune" / "model" / "model.safetensors")
    pruned = sum(int((~m).sum()) for m in masks.values())
    total_prunable = sum(m.numel() for m in masks.values())
    assert pruned == round(0.5 * total_prunable)
    for name, mask in masks.items():
        assert torch.count_nonzero(weights[name][~mask]) == 0
        assert torch.count_nonzero(weights[name][mask]) == int(mask.sum())
    assert results["prune"]["prunable_sparsity"] == pytest.approx(0.5, abs=1e-3)

    # eval: every model, with sizes; export: reloads as a user would, same predictions as the trained model.
    table = json.loads((run / "eval" / "results.json").read_text())["models"]
    assert [r["phase"] for r in table] == ["teacher", "distill", "prune"]
    assert table[1]["parameters"] < table[0]["parameters"] and table[2]["nonzero_parameters"] < table[1]["parameters"]
    from transformers import AutoModelForSequenceClassification

    exported = AutoModelForSequenceClassification.from_pretrained(str(run / "export" / "model")).eval()
    trained = AutoModelForSequenceClassification.from_pretrained(str(run / "prune" / "model")).eval()
    ids = torch.randint(0, 1000, (16, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(exported(input_ids=ids).logits, trained(input_ids=ids).logits)
    card = (run / "export" / "model" / "README.md").read_text()
    assert f"{total:.3f}" in card and "prune" in card and "teacher" in card and "Poisson".lower() in card.lower()

    # Resume: lose the end of the prune phase (after its step-4 checkpoint of round 2); it continues
    # from the checkpoint to bit-identical weights, and the ledger neither forgets nor double-counts.
    before = {k: v.clone() for k, v in weights.items()}
    ledger_file = run / "privacy_ledger.json"
    ledger_text = json.dumps(json.loads(ledger_file.read_text())["phases"])
    # What a kill during round 2 leaves: the prune entry still running (its reservation counted), its
    # releases up to round 1, no round-2 model, done.json or results.json.
    crashed = json.loads(ledger_file.read_text())
    entry = crashed["phases"]["prune"]
    assert entry["released"][-1]["steps"] == entry["released"][-2]["steps"]  # round 2's DP-SGD, the last release
    entry["released"] = entry["released"][:-1]
    entry["status"] = "running"
    ledger_file.write_text(json.dumps(crashed))
    for path in ("prune/results.json", "prune/round2/done.json"):
        (run / path).unlink()
    shutil.rmtree(run / "prune" / "model")
    shutil.rmtree(run / "prune" / "round2" / "model")
    again = ok(dpc(["prune", *args], timeout=400))
    assert "resumed from step00000004" in again.stdout
    after = load_file(run / "prune" / "model" / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert json.dumps(json.loads((run / "privacy_ledger.json").read_text())["phases"]) == ledger_text

    # A student of this tree's teacher in another tree imports the teacher's lineage only, not the
    # phases recorded after it (distill, prune), and spends the rest of its own target.
    ok(dpc(["distill", CONFIG, f"run.output_dir={tmp_path}", "run.name=q", *TINY, "privacy.target_epsilon=6",
            "pipeline.phases=[distill]", f"distill.teacher={run / 'teacher' / 'model'}", "distill.alpha=0"]))
    q = json.loads((tmp_path / "q" / "privacy_ledger.json").read_text())["phases"]
    imported = q[f"imported:{(run / 'teacher' / 'model').resolve()}"]
    assert [m["steps"] for m in imported["mechanisms"]] == [6]
    assert imported["mechanisms"][0]["noise_multiplier"] == ledger["phases"]["teacher"]["mechanisms"][0]["noise_multiplier"]
    assert 6 * 0.99 <= json.loads((tmp_path / "q" / "distill" / "results.json").read_text())["epsilon"] <= 6 * (1 + 1e-6)


@pytest.mark.timeout(900)
def test_budget_refusal_structured_and_2_4_pruning_with_an_imported_teacher(tmp_path):
    # A tree whose sigma is fixed: the teacher fits in epsilon = 4, a second phase would not.
    fixed = [CONFIG, f"run.output_dir={tmp_path}", "run.name=fixed", *TINY, "privacy.target_epsilon=2.6",
             "privacy.noise_multiplier=0.7", "pipeline.phases=[teacher, distill]",
             "pipeline.budget_split={teacher: 0.95, distill: 0.05}"]
    ok(dpc(["teacher", *fixed]))
    ledger_before = (tmp_path / "fixed" / "privacy_ledger.json").read_text()
    refused = dpc(["distill", *fixed])
    assert refused.returncode == 2
    assert "would bring the run's total epsilon" in refused.stderr and "privacy.target_epsilon=2.6" in refused.stderr
    assert not (tmp_path / "fixed" / "distill" / "model").exists()
    assert (tmp_path / "fixed" / "privacy_ledger.json").read_text() == ledger_before

    teacher_dir = tmp_path / "fixed" / "teacher" / "model"
    teacher_mechs = json.loads(ledger_before)["phases"]["teacher"]["mechanisms"]
    # Structured DPIMP from a teacher of another tree: its cost is imported into this tree's ledger.
    # A relative run.output_dir (as in the demo and the docs) must work as well as an absolute one.
    structured = [CONFIG, f"run.output_dir={os.path.relpath(tmp_path, ROOT)}", "run.name=structured", *TINY, "privacy.target_epsilon=8",
                  "pipeline.phases=[prune, eval]", "prune.method=structured", "prune.rounds=1",
                  f"prune.source={teacher_dir}"]
    ok(dpc(["pipeline", *structured]))
    ledger = json.loads((tmp_path / "structured" / "privacy_ledger.json").read_text())
    name = f"imported:{teacher_dir.resolve()}"
    assert ledger["phases"][name]["mechanisms"] == [dict(m, phase=name) for m in teacher_mechs]
    results = json.loads((tmp_path / "structured" / "prune" / "results.json").read_text())
    all_mechs = [Mechanism(m["noise_multiplier"], m["sample_rate"], m["steps"])
                 for e in ledger["phases"].values() for m in e["mechanisms"]]
    assert results["epsilon"] == pytest.approx(compute_epsilon(all_mechs, ledger["delta"]), rel=1e-6)
    assert 8 * 0.99 <= results["epsilon"] <= 8 * (1 + 1e-6)
    assert results["kept_layers"] and len(results["kept_layers"]) == 1
    assert json.loads((tmp_path / "structured" / "prune" / "model" / "config.json").read_text())["num_hidden_layers"] == 1
    evaluated = json.loads((tmp_path / "structured" / "eval" / "results.json").read_text())["models"]
    assert evaluated[0]["layers"] == 1 and 0 <= evaluated[0]["metrics"]["validation"]["accuracy"] <= 1

    # 2:4: every group of four consecutive input weights of the blocks' matrices keeps at most two.
    two_four = [CONFIG, f"run.output_dir={tmp_path}", "run.name=24", *TINY, "privacy.target_epsilon=8",
                "pipeline.phases=[prune]", "prune.method=2:4", "prune.rounds=1", f"prune.source={teacher_dir}"]
    ok(dpc(["pipeline", *two_four]))
    masks = torch.load(tmp_path / "24" / "prune" / "round1" / "masks.pt")
    weights = load_file(tmp_path / "24" / "prune" / "model" / "model.safetensors")
    for name in masks:
        groups = (weights[name] != 0).reshape(weights[name].shape[0], -1, 4).sum(-1)
        assert int(groups.max()) <= 2


@pytest.mark.timeout(300)
def test_phase_needs_its_source_and_non_private_teachers_are_refused(tmp_path):
    lonely = dpc(["distill", CONFIG, f"run.output_dir={tmp_path}", "run.name=lonely", *TINY])
    assert lonely.returncode == 2 and "run `dpc teacher` first" in lonely.stderr
    # Through the launchers' entry (srun / torchrun / deepspeed run `python -m dist_dpc.train CONFIG --phase P`).
    import subprocess
    import sys

    from tests.pipeline.test_train import env

    launched = subprocess.run([sys.executable, "-m", "dist_dpc.train", CONFIG, "--phase", "teacher",
                               f"run.output_dir={tmp_path}", "run.name=public", *TINY, "privacy.enabled=false",
                               "--local_rank=0"], capture_output=True, text=True, timeout=300, env=env(), cwd=ROOT)
    ok(launched)
    assert (tmp_path / "public" / "teacher" / "results.json").is_file()
    leaky = dpc(["distill", CONFIG, f"run.output_dir={tmp_path}", "run.name=leaky", *TINY,
                 f"distill.teacher={tmp_path / 'public' / 'teacher' / 'model'}"])
    assert leaky.returncode == 2 and "WITHOUT differential privacy" in leaky.stderr
    # The same teacher inside the private tree itself (a non-private phase, then a private one with
    # run.overwrite): its lineage is read wherever it lies, so it is refused there too.
    inside = dpc(["distill", CONFIG, f"run.output_dir={tmp_path}", "run.name=public", *TINY, "run.overwrite=true"])
    assert inside.returncode == 2 and "WITHOUT differential privacy" in inside.stderr
    assert not (tmp_path / "public" / "distill" / "model").exists()


@pytest.mark.timeout(900)
def test_a_prune_checkpoint_written_at_world_2_resumes_at_world_1(tmp_path):
    """ZeRO 2 on 2 real ranks writes one optimizer shard per rank; a resume on 1 rank goes through
    DeepSpeed's universal checkpoint (converted once) and continues where the 2 ranks were. Without
    noise the continuation must then match the uninterrupted 2-rank run up to summation order, which
    only holds if the fp32 weights and both Adam moments were re-partitioned exactly; the pruned
    coordinates stay exactly zero."""
    from tests.engine.launch import torchrun

    args = [CONFIG, f"run.output_dir={tmp_path}", "run.name=w", *TINY, "privacy.enabled=false", "train.zero_stage=2",
            "pipeline.phases=[teacher, prune]", "pipeline.budget_split={}", "prune.rounds=1",
            "train.checkpoint_every=2", "train.optimizer=adamw"]
    ok(dpc(["teacher", *args]))
    torchrun("dist_dpc/cli.py", ["prune", *args], world_size=2, timeout=600)
    run = tmp_path / "w"
    straight = load_file(run / "prune" / "model" / "model.safetensors")
    # What a kill after the step-4 checkpoint leaves (as in the one-process resume test above).
    for path in ("prune/results.json", "prune/round1/done.json"):
        (run / path).unlink()
    for path in ("prune/model", "prune/round1/model"):
        shutil.rmtree(run / path)
    again = ok(dpc(["prune", *args], timeout=400))
    assert "resumed from step00000004" in again.stdout
    assert (run / "prune" / "round1" / "checkpoints" / "step00000004-universal").is_dir()
    resumed = load_file(run / "prune" / "model" / "model.safetensors")
    masks = torch.load(run / "prune" / "round1" / "masks.pt")
    for name, mask in masks.items():
        assert torch.count_nonzero(resumed[name][~mask]) == 0, name
    for name, value in straight.items():
        torch.testing.assert_close(resumed[name], value, rtol=1e-4, atol=1e-5, msg=name)
    moved = sum(int((resumed[n] != load_file(run / "teacher" / "model" / "model.safetensors")[n]).sum()) for n in masks)
    assert moved > 0
    # The world size may change, the ZeRO stage may not (the run's saved config says which it was).
    for path in ("prune/results.json", "prune/round1/done.json"):
        (run / path).unlink()
    refused = dpc(["prune", *[a for a in args if a != "train.zero_stage=2"], "train.zero_stage=1"])
    assert refused.returncode == 2 and "train.zero_stage: 2 -> 1" in refused.stderr, refused.stderr[-2000:]


def test_which_checkpoints_need_the_universal_format(tmp_path):
    """Only a partitioned checkpoint (ZeRO >= 1) written at another world size; another ZeRO stage is
    refused (a DeepSpeed JSON whose stage changed between attempts, which the run's config cannot see)."""
    from types import SimpleNamespace

    from dist_dpc.pipeline.checkpoints import LAYOUT, Checkpoints

    def at(world_size, written):
        (tmp_path / "step00000004").mkdir(exist_ok=True)
        (tmp_path / "latest_complete").write_text("step00000004")
        (tmp_path / "step00000004" / LAYOUT).write_text(json.dumps(written))
        return Checkpoints(tmp_path, keep=1, world=SimpleNamespace(world_size=world_size, is_main=True))

    assert at(1, {"world_size": 2, "zero_stage": 2}).needs_universal(2)
    assert not at(2, {"world_size": 2, "zero_stage": 2}).needs_universal(2)
    assert not at(1, {"world_size": 2, "zero_stage": 0}).needs_universal(0)  # replicated: loads anywhere
    with pytest.raises(ValueError, match="resume with train.zero_stage=3"):
        at(1, {"world_size": 2, "zero_stage": 3}).needs_universal(2)


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("hidden_weight", [0.2, 0.0])
def test_distill_at_zero3_on_two_ranks_partitions_the_teacher(tmp_path, hidden_weight):
    """`dpc distill` under torchrun at ZeRO 3: the teacher is partitioned (each rank half of it), and
    the pass that builds its logits table stays in lockstep although the ranks' shares differ (129
    and 128 examples: 3 and 2 batches of 64) -- a partitioned teacher's forward is a collective, so a
    rank that stopped early would hang the other. With the hidden-state term the teacher also runs
    in every step; without it the steps read the table."""
    from tests.engine.launch import torchrun

    args = [CONFIG, f"run.output_dir={tmp_path}", "run.name=z", *TINY, "data.synthetic_size=257", "train.max_steps=3",
            "train.zero_stage=3", "privacy.target_epsilon=6", "pipeline.phases=[teacher, distill]",
            "pipeline.budget_split={teacher: 0.5, distill: 0.5}", "head_init.probe_epochs=1",
            "head_init.centre_pooler=true", f"distill.hidden_weight={hidden_weight}"]
    ok(dpc(["teacher", *args]))
    out = torchrun("dist_dpc/cli.py", ["distill", *args], world_size=2, timeout=600).stdout
    assert "teacher partitioned over 2 ranks (ZeRO 3)" in out
    ledger = json.loads((tmp_path / "z" / "privacy_ledger.json").read_text())["phases"]
    assert ledger["distill"]["status"] == "completed"
    assert json.loads((tmp_path / "z" / "distill" / "results.json").read_text())["epsilon"] <= 6 * (1 + 1e-6)


def test_a_killed_saves_leftovers_never_join_a_checkpoint(tmp_path):
    """A save killed before the pointer moved leaves its tag's shard files (maybe of more ranks than
    the next attempt has). Saving that tag again starts from an empty directory, so a later
    conversion to the universal format cannot merge the killed attempt's state (its unaccounted
    steps) into this one; a directory whose shards do not match its layout is refused."""
    from types import SimpleNamespace

    from dist_dpc.engine import init_distributed
    from dist_dpc.pipeline.checkpoints import LAYOUT, Checkpoints

    init_distributed()
    (tmp_path / "step00000004").mkdir()
    (tmp_path / "step00000004" / LAYOUT).write_text(json.dumps({"world_size": 1, "zero_stage": 3}))
    (tmp_path / "latest_complete").write_text("step00000004")
    stale = tmp_path / "step00000008"
    stale.mkdir()
    (stale / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_text("killed attempt")
    (tmp_path / "step00000008-universal").mkdir()

    class Engine:
        steps_done = 8
        ds = SimpleNamespace(zero_optimization_stage=lambda: 3)

        def save_checkpoint(self, directory, tag, client_state=None):
            (directory / tag).mkdir(exist_ok=True)
            (directory / tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_text("this attempt")

    checkpoints = Checkpoints(tmp_path, keep=2, world=SimpleNamespace(world_size=1, is_main=True))
    assert checkpoints.save(Engine()) == "step00000008"
    assert sorted(p.name for p in stale.iterdir()) == [LAYOUT, "zero_pp_rank_0_mp_rank_00_optim_states.pt"]
    assert not (tmp_path / "step00000008-universal").exists() and checkpoints.latest() == "step00000008"
    assert checkpoints.save(Engine()) == "step00000008"  # the same state again: nothing rewritten
    (stale / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_text("planted")
    with pytest.raises(RuntimeError, match="2 optimizer shards but was written by 1 ranks"):
        checkpoints.load(None, universal=True)


@pytest.mark.timeout(600)
def test_a_teacher_with_fewer_positions_than_the_batches_is_refused_before_spending(tmp_path):
    """DPKD runs the teacher on the phase's batches: a DP teacher whose positions cannot hold
    data.max_length is refused before the distill phase reserves budget (else the teacher pass or a
    step that drew a long example would fail midway, after the reservation)."""
    from safetensors.torch import save_file

    ok(dpc(["teacher", CONFIG, f"run.output_dir={tmp_path}", "run.name=t", *TINY, "privacy.target_epsilon=4"]))
    short = tmp_path / "short"
    shutil.copytree(tmp_path / "t" / "teacher" / "model", short)
    config = json.loads((short / "config.json").read_text())
    config["max_position_embeddings"] = 16
    (short / "config.json").write_text(json.dumps(config))
    weights = load_file(short / "model.safetensors")
    key = next(k for k in weights if k.endswith("position_embeddings.weight"))
    weights[key] = weights[key][:16].clone()
    save_file(weights, short / "model.safetensors", metadata={"format": "pt"})
    refused = dpc(["distill", CONFIG, f"run.output_dir={tmp_path}", "run.name=s", *TINY, "data.max_length=24",
                   f"distill.teacher={short}", "distill.student=tiny-bert"])
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert "the distill phase's teacher" in refused.stderr and "at most 16" in refused.stderr, refused.stderr[-3000:]
    ledger = json.loads((tmp_path / "s" / "privacy_ledger.json").read_text())
    assert not ledger["phases"].get("distill", {}).get("mechanisms"), ledger["phases"].keys()
