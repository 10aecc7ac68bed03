"""The whole compression chain (teacher -> distill -> prune -> eval -> export) on 2 real ranks at
ZeRO 3 against the same chain at ZeRO 0: the exported Hugging Face directory predicts the same,
structured pruning keeps the same layers, and the ledger is the same (issue 16, item 5)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dist_dpc.models import ModelConfig, load_tokenizer
from dist_dpc.models.loading import load_causal_lm
from tests.pipeline.test_train import ROOT, dpc

# Layer i's matrices are scaled by SCALE[i], so the importance ranking (mean |w|) has wide margins:
# with the last layer protected, 4 -> 3 removes layer 1 and 3 -> 2 removes layer 0.
SCALE = (1.0, 0.5, 1.5, 0.8)
KEPT = [2, 3]


def four_layer_classifier(path: Path) -> Path:
    from transformers import BertConfig, BertForSequenceClassification

    tok = load_tokenizer(ModelConfig(name="tiny-bert"), log=None)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128, num_labels=2, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = BertForSequenceClassification(cfg)
    with torch.no_grad():
        for layer, scale in zip(model.bert.encoder.layer, SCALE):
            for module in layer.modules():
                if isinstance(module, torch.nn.Linear):
                    module.weight.mul_(scale)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def chain_args(tmp_path: Path, name: str, model: Path, stage: int, private: bool) -> list[str]:
    privacy = (["privacy.target_epsilon=8", "pipeline.budget_split={teacher: 0.4, distill: 0.3, prune: 0.3}"] if private
               else ["privacy.enabled=false", "pipeline.budget_split={}"])
    return ["pipeline", str(ROOT / "configs" / "debug.yaml"), f"run.output_dir={tmp_path}", f"run.name={name}",
            f"model.name={model}", f"privacy.public_model_dirs=[{model}]", "model.dropout=0", "data.synthetic_size=240", "data.max_length=16",
            "train.batch_size=24", "train.micro_batch_size=12", "train.lr=5e-3", "train.max_steps=4",
            "privacy.randomness=insecure_reproducible", "privacy.noise_seed=11", f"train.zero_stage={stage}",
            "pipeline.phases=[teacher, distill, prune, eval, export]", "distill.hidden_weight=0.2",
            "prune.method=structured", "prune.source=teacher", "prune.target_layers=2", "prune.rounds=2", *privacy]


def predictions(model_dir: Path) -> torch.Tensor:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    batch = tok(["a fine film", "dull and far too long", "the best thing this year", "not good"], padding=True,
                return_tensors="pt")
    with torch.no_grad():
        return model(**batch).logits


def assert_built_partitioned(out: str, stage: int, where: list[str]) -> None:
    """At ZeRO 3 every model a phase trains or runs was built under zero.Init (never whole on a rank):
    rank 0 held about half of it from the start; at ZeRO 0 none was."""
    import re

    built = re.findall(r"\[([a-z_]+)\] (model|teacher|student) built partitioned over 2 ranks \(zero.Init\): rank 0 "
                       r"holds ([\d,]+) of its ([\d,]+) parameters", out)
    if stage != 3:
        assert not built
        return
    for label in where:
        phase, _, what = label.partition("] ")
        found = [(int(a.replace(",", "")), int(b.replace(",", ""))) for p, w, a, b in built
                 if p == phase and (not what or w == what)]
        assert found, (label, out[-3000:])
        assert all(local < 0.6 * whole for local, whole in found), (label, found)


@pytest.mark.timeout(900)
def test_the_chain_at_zero3_on_two_ranks_exports_what_the_zero0_chain_exports(tmp_path):
    from tests.engine.launch import torchrun

    model = four_layer_classifier(tmp_path / "base")
    runs = {}
    for stage in (0, 3):  # without noise, the two runs differ only by summation order
        out = torchrun("dist_dpc/cli.py", chain_args(tmp_path, f"z{stage}", model, stage, private=False), world_size=2,
                       timeout=400).stdout
        runs[stage] = tmp_path / f"z{stage}"
        assert_built_partitioned(out, stage, ["teacher", "distill] teacher", "distill] student", "prune"])
    for stage, run in runs.items():
        prune = json.loads((run / "prune" / "results.json").read_text())
        assert prune["kept_layers"] == KEPT, (stage, prune["kept_layers"])
        assert json.loads((run / "prune" / "round1" / "done.json").read_text())["kept_layers"] == [0, 2, 3]
    exported = {stage: run / "export" / "model" for stage, run in runs.items()}
    assert json.loads((exported[3] / "config.json").read_text())["num_hidden_layers"] == 2
    zero0, zero3 = predictions(exported[0]), predictions(exported[3])
    torch.testing.assert_close(zero3, zero0, rtol=1e-3, atol=1e-4)
    teacher0 = predictions(runs[0] / "teacher" / "model")
    assert not torch.allclose(zero0, teacher0, atol=1e-3)  # the chain changed the model: the comparison has teeth
    for phase in ("distill", "prune"):  # the partitioned teacher and the ZeRO-3 rounds: same weights
        a = json.loads((runs[0] / phase / "results.json").read_text())["metrics"]
        b = json.loads((runs[3] / phase / "results.json").read_text())["metrics"]
        assert a["validation"]["accuracy"] == b["validation"]["accuracy"], phase

    # Under DP the noise streams differ (ZeRO 3 draws per partition), the accounting may not: the
    # ledger of the 2-rank ZeRO-3 chain is the one-process ZeRO-0 chain's, mechanism by mechanism.
    torchrun("dist_dpc/cli.py", chain_args(tmp_path, "dp3", model, 3, private=True), world_size=2, timeout=400)
    proc = dpc(chain_args(tmp_path, "dp0", model, 0, private=True), timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ledgers = {name: json.loads((tmp_path / name / "privacy_ledger.json").read_text()) for name in ("dp0", "dp3")}
    phases = {name: {p: {k: v for k, v in entry.items() if k in ("status", "mechanisms", "released", "reservation")}
                     for p, entry in ledger["phases"].items()} for name, ledger in ledgers.items()}
    assert {"teacher", "distill", "prune"} <= set(phases["dp3"]) and phases["dp3"] == phases["dp0"]
    assert all(phases["dp3"][p]["status"] == "completed" for p in ("teacher", "distill", "prune"))
    for key in ("target_epsilon", "delta", "dataset_size", "accountant"):
        assert ledgers["dp3"][key] == ledgers["dp0"][key], key
    assert json.loads((tmp_path / "dp3" / "prune" / "results.json").read_text())["epsilon"] <= 8 * (1 + 1e-6)
    assert (tmp_path / "dp3" / "export" / "model" / "model.safetensors").is_file()


@pytest.mark.timeout(900)
def test_the_causal_lm_chain_at_zero3_on_two_ranks_exports_what_the_zero0_chain_exports(tmp_path):
    """The generative path: a DP-LoRA tiny Llama teacher, its half-depth student (hidden-state loss
    through the partitioned teacher), unstructured pruning of the teacher in 2 rounds, export."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from tests.engine.launch import torchrun

    # A saved model, as a user starts from (the pipeline builds a debug model from its config whole, so
    # the teacher would not be built partitioned).
    base = tmp_path / "base"
    tok = load_tokenizer(ModelConfig(name="tiny-llama", task="causal_lm"), log=None)
    load_causal_lm(ModelConfig(name="tiny-llama", task="causal_lm", dropout=0.0), tok, seed=0).save_pretrained(base)
    tok.save_pretrained(base)
    for stage in (0, 3):
        out = torchrun("dist_dpc/cli.py", [
            "pipeline", str(ROOT / "configs" / "debug_lm.yaml"), f"run.output_dir={tmp_path}", f"run.name=z{stage}",
            f"model.name={base}", f"privacy.public_model_dirs=[{base}]",
            "model.dropout=0", "data.synthetic_size=240", "data.max_length=24", "train.batch_size=24",
            "train.micro_batch_size=12", "train.max_steps=4", "privacy.enabled=false",
            "privacy.randomness=insecure_reproducible", "privacy.noise_seed=11", "pipeline.budget_split={}",
            f"train.zero_stage={stage}", "pipeline.phases=[teacher, distill, prune, eval, export]",
            "distill.hidden_weight=0.2", "prune.method=unstructured", "prune.target_sparsity=0.5", "prune.rounds=2",
            "prune.source=teacher"], world_size=2, timeout=400).stdout
        assert_built_partitioned(out, stage, ["teacher", "distill] teacher", "distill] student", "prune"])
    ids = torch.tensor([[1, 70, 105, 110, 101, 32, 102, 111, 111, 100]])
    logits = {}
    for stage in (0, 3):
        model = AutoModelForCausalLM.from_pretrained(tmp_path / f"z{stage}" / "export" / "model").eval()
        with torch.no_grad():
            logits[stage] = model(input_ids=ids).logits
    torch.testing.assert_close(logits[3], logits[0], rtol=1e-3, atol=1e-4)
    for phase in ("distill", "export"):
        a = load_file(tmp_path / "z0" / phase / "model" / "model.safetensors")
        b = load_file(tmp_path / "z3" / phase / "model" / "model.safetensors")
        teacher = load_file(tmp_path / "z0" / "teacher" / "model" / "model.safetensors")
        assert sorted(a) == sorted(b)
        for name in a:
            torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5, msg=f"{phase}: {name}")
        assert any(not torch.equal(a[n], teacher[n]) for n in a if n in teacher)  # trained: the test has teeth
    masks = torch.load(tmp_path / "z3" / "prune" / "round2" / "masks.pt")
    exported = load_file(tmp_path / "z3" / "export" / "model" / "model.safetensors")
    assert masks and all(torch.count_nonzero(exported[name][~mask]) == 0 for name, mask in masks.items())
    assert sum(int((~mask).sum()) for mask in masks.values()) / sum(m.numel() for m in masks.values()) == \
        pytest.approx(0.5, abs=0.01)


@pytest.mark.timeout(600)
def test_head_init_at_zero3_sets_the_head_zero0_sets_and_training_starts_from_it(tmp_path):
    """head_init on a model built partitioned (its [CLS] pass gathered module by module, the head set
    inside GatheredParameters) gives the ZeRO-0 head bit for bit, on uneven shares of the rows (129
    over 2 ranks), and DeepSpeed's fp32 masters start from it: with a vanishing learning rate the
    trained model's head is the head_init head, not the pre-trained one."""
    from safetensors.torch import load_file

    from tests.engine.launch import torchrun

    model = four_layer_classifier(tmp_path / "base")
    base = load_file(model / "model.safetensors")
    heads = {}
    for stage in (0, 3):
        out = torchrun("dist_dpc/cli.py", [
            "train", str(ROOT / "configs" / "debug.yaml"), f"run.output_dir={tmp_path}", f"run.name=z{stage}",
            f"model.name={model}", f"privacy.public_model_dirs=[{model}]", "model.dropout=0", "data.synthetic_size=129",
            "data.max_length=16", "train.batch_size=24", "train.micro_batch_size=12", "train.lr=1e-12",
            "train.max_steps=1", "privacy.randomness=insecure_reproducible", "privacy.noise_seed=11",
            "head_init.centre_pooler=true", "head_init.probe_epochs=1", "wandb.mode=disabled",
            f"train.zero_stage={stage}"], world_size=2, timeout=300).stdout
        assert_built_partitioned(out, stage, ["train"])
        run = tmp_path / f"z{stage}"
        heads[stage] = torch.load(run / "head_init.pt", weights_only=True)
        trained = load_file(run / "model" / "model.safetensors")
        for part, prefix in (("pooler", "bert.pooler."), ("classifier", "classifier.")):
            for name, value in heads[stage][part].items():
                key = prefix + name
                torch.testing.assert_close(trained[key], value, rtol=0, atol=1e-6, msg=f"ZeRO {stage}: {key}")
                if part == "classifier":  # head_init moved it: the comparison above has teeth
                    assert (value - base[key]).abs().max() > 1e-2, key
    for part in ("pooler", "classifier"):
        for name, value in heads[0][part].items():
            torch.testing.assert_close(heads[3][part][name], value, rtol=0, atol=0, msg=f"{part}.{name}")
