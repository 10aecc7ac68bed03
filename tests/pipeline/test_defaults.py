"""The defaults are the recipe of docs/RESULTS.md: a config that names only the model and the data
trains DP-LoRA after head_init (for a BERT-style classifier; not for any other head) and compresses
with DP-BiTFiT; what the defaults cannot do is refused before anything is spent."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file

from tests.pipeline.test_phases import ok
from tests.pipeline.test_train import dpc

# Only the data size and the length of the run are set (a test must be quick); everything that
# decides how the model trains is the default.
SMALL = ["data.task=synthetic_sentiment", "data.synthetic_size=240", "data.max_length=16", "train.batch_size=24",
         "train.micro_batch_size=12", "train.max_steps=4", "wandb.mode=disabled",
         "privacy.randomness=insecure_reproducible", "privacy.noise_seed=3"]


def config(tmp_path, model: str) -> str:
    path = tmp_path / f"{model}.yaml"
    path.write_text(f"model:\n  name: {model}\n")
    return str(path)


def mechanisms(run, phase):
    ledger = json.loads((run / "privacy_ledger.json").read_text())
    return [(m["noise_multiplier"], m["sample_rate"], m["steps"]) for m in ledger["phases"][phase]["mechanisms"]]


@pytest.mark.timeout(900)
def test_defaults_train_dp_lora_after_head_init_and_distill_every_student_weight(tmp_path):
    args = [config(tmp_path, "tiny-bert"), f"run.output_dir={tmp_path}", "run.name=d", *SMALL,
            "privacy.target_epsilon=8", "pipeline.phases=[teacher, distill]",
            "pipeline.budget_split={teacher: 0.5, distill: 0.5}"]
    ok(dpc(["pipeline", *args], timeout=800))
    run = tmp_path / "d"
    teacher = json.loads((run / "teacher" / "results.json").read_text())
    n = teacher["dataset_size"]
    probe = 2 * -(-n // 24)  # head_init's default probe: 2 epochs at the phase's batch
    from dist_dpc.pipeline.config import mean_noise_for

    # the DP mean's default sigma is scaled to N and the width (tiny-bert: 32) within [5, 20]
    assert mechanisms(run, "teacher") == [(mean_noise_for(n, 32), 1.0, 1), (teacher["noise_multiplier"], 24 / n, probe + 4)]
    assert set(teacher["head_init"]) == {"pooler", "probe"}

    from dist_dpc.models import ModelConfig, load_sequence_classifier, load_tokenizer

    # DP-LoRA on query and value: saved merged, so those matrices moved; every other pre-trained
    # matrix and the (frozen) embeddings are the pre-trained ones.
    plain = ModelConfig(name="tiny-bert", dropout=0.0, lora=None)
    start = load_sequence_classifier(plain, 2, load_tokenizer(plain), seed=0).state_dict()
    trained = load_file(run / "teacher" / "model" / "model.safetensors")
    assert not any("lora" in name for name in trained)
    for name, value in trained.items():
        moved = not torch.equal(value, start[name])
        if name.endswith(("query.weight", "value.weight")) or name.startswith(("classifier.", "bert.pooler.")):
            continue
        assert not moved, f"{name} trained, but only the adapters and the head do by default"
    assert all(not torch.equal(trained[k], start[k]) for k in trained if k.endswith("query.weight"))

    # DPKD by default: the student (every other teacher layer) trains all its weights but the frozen
    # embeddings (and the centred pooler's identity weight, which head_init keeps fixed).
    student = load_file(run / "distill" / "model" / "model.safetensors")
    assert not torch.equal(student["bert.encoder.layer.0.output.dense.bias"], trained["bert.encoder.layer.0.output.dense.bias"])
    for name, value in student.items():
        if name.startswith("bert.encoder.") and name.endswith(".weight"):
            source = name.replace("layer.1.", "layer.2.") if ".layer.1." in name else name  # student layer 1 = teacher layer 2
            assert not torch.equal(value, trained[source]), f"{name} did not train in the student"
        if name.endswith("_embeddings.weight") or name == "bert.pooler.dense.weight":  # the embedding tables
            assert torch.equal(value, trained[name]), f"{name} trained, but it is frozen by default"


@pytest.mark.timeout(600)
def test_head_init_defaults_to_off_for_a_head_without_a_pooler(tmp_path):
    ok(dpc(["train", config(tmp_path, "tiny-gpt2"), f"run.output_dir={tmp_path}", "run.name=g", *SMALL,
            "privacy.target_epsilon=4"]))
    results = json.loads((tmp_path / "g" / "results.json").read_text())
    assert "head_init" not in results
    assert mechanisms(tmp_path / "g", "train") == [(results["noise_multiplier"], results["sample_rate"], 4)]
    # Asked for explicitly, it is refused for this head, naming the setting, before anything is reserved.
    refused = dpc(["train", config(tmp_path, "tiny-gpt2"), f"run.output_dir={tmp_path}", "run.name=h", *SMALL,
                   "head_init.probe_epochs=1"])
    assert refused.returncode != 0 and "head_init" in refused.stderr and "BERT-style" in refused.stderr
    ledger = tmp_path / "h" / "privacy_ledger.json"
    assert not ledger.exists() or not json.loads(ledger.read_text())["phases"]


@pytest.mark.timeout(600)
def test_settings_the_engine_refuses_are_refused_before_head_init_reads_data(tmp_path):
    # A DeepSpeed JSON that clips gradients itself; one whose scheduler clashes with the default
    # linear schedule; each refused with head_init (default) not yet run.
    (tmp_path / "clip.json").write_text(json.dumps({"gradient_clipping": 1.0}))
    (tmp_path / "sched.json").write_text(json.dumps({"scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 2}}}))
    # data.max_length beyond tiny-bert's 128 positions: refused, saying the most it can read.
    cases = [(f"train.deepspeed_config={tmp_path / 'clip.json'}", "gradient_clipping"),
             (f"train.deepspeed_config={tmp_path / 'sched.json'}", "scheduler block"),
             ("data.max_length=200", "set data.max_length to at most 128")]
    for i, (setting, message) in enumerate(cases):
        refused = dpc(["train", config(tmp_path, "tiny-bert"), f"run.output_dir={tmp_path}", f"run.name=z{i}", *SMALL,
                       setting])
        assert refused.returncode != 0 and message in refused.stderr, (setting, refused.stderr[-2000:])
        ledger = tmp_path / f"z{i}" / "privacy_ledger.json"
        assert not ledger.exists() or not any(e["mechanisms"] for e in json.loads(ledger.read_text())["phases"].values())
        assert not (tmp_path / f"z{i}" / "head_init.pt").exists()


@pytest.mark.timeout(600)
def test_a_training_set_too_small_for_the_epsilon_is_refused_with_the_smallest_reachable_one(tmp_path):
    base = [config(tmp_path, "tiny-bert"), f"run.output_dir={tmp_path}", *SMALL, "train.max_steps=null",
            "train.epochs=10"]
    no_head_init = ["head_init.probe_epochs=0", "head_init.centre_pooler=false"]
    refused = dpc(["train", *base, "run.name=s", "privacy.target_epsilon=0.001", *no_head_init])
    assert refused.returncode == 2, refused.stderr[-2000:]
    message = refused.stderr
    assert "privacy.target_epsilon=0.001 is unreachable" in message and "smallest epsilon" in message
    smallest = float(re.search(r"allow is about ([0-9.e+-]+)", message).group(1))
    assert smallest > 0.001
    ledger = tmp_path / "s" / "privacy_ledger.json"
    assert not ledger.exists() or not any(e["mechanisms"] for e in json.loads(ledger.read_text())["phases"].values())
    # Just above it, the noise would drown every gradient (privacy.max_effective_noise): refused too,
    # saying the smallest epsilon at which this data size trains usefully ...
    refused = dpc(["train", *base, "run.name=s2", f"privacy.target_epsilon={smallest * 1.05:.6g}", *no_head_init])
    assert refused.returncode == 2 and "too small for this privacy budget" in refused.stderr, refused.stderr[-2000:]
    useful = float(re.search(r"allows for 100 steps at that limit is ([0-9.e+-]+)", refused.stderr).group(1))
    # ... and at that epsilon it trains.
    ok(dpc(["train", *base, "run.name=s3", f"privacy.target_epsilon={useful * 1.02:.6g}", *no_head_init], timeout=600))
    # With head_init (the default), its DP mean alone can be above the target: said as such.
    refused = dpc(["train", *base, "run.name=s4", "privacy.target_epsilon=0.001"])
    assert refused.returncode == 2 and "head_init's DP mean" in refused.stderr, refused.stderr[-2000:]
    assert "smallest epsilon this run allows is above" in refused.stderr


@pytest.mark.parametrize("name", ["tiny-bert", "minilm"])
def test_dropout_is_off_by_default_and_null_keeps_the_pretrained_value(name):
    from dist_dpc.models import ModelConfig, load_sequence_classifier, load_tokenizer

    def dropouts(model_config):
        model = load_sequence_classifier(model_config, 2, load_tokenizer(model_config), seed=0)
        return {m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)}

    assert dropouts(ModelConfig(name=name)) == {0.0}
    assert dropouts(ModelConfig(name=name, dropout=None)) == {0.1}  # BERT's and MiniLM's own value
