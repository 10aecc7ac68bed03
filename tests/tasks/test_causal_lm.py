"""causal_lm: what carries loss, perplexity against a hand computation, training and export end to end
(DP-LoRA at ZeRO-3 on two real ranks, reloaded by transformers and peft), and bad input."""

from __future__ import annotations

import csv
import json
import math
import random
from pathlib import Path

import pytest
import torch

from dist_dpc.data import DataConfig
from dist_dpc.data.lm import collate_lm, prompt_ids, tokenize_lm
from dist_dpc.data.splits import TextSplit
from dist_dpc.models import ModelConfig, load_causal_lm, load_tokenizer
from dist_dpc.tasks import make_task
from tests.pipeline.test_train import ROOT, dpc

LM = ModelConfig(name="tiny-llama", task="causal_lm", dropout=0.0)


def write_yelp(path: Path, n: int, seed: int, tag: str) -> None:
    rng = random.Random(seed)
    words = "the food was great and the staff were friendly but the wait was long".split()
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["text", "label1", "label2"])
        for i in range(n):
            text = " ".join(rng.choice(words) for _ in range(rng.randint(3, 20))) + f" {tag}{i}"
            w.writerow([text, rng.choice(["Business Category: Bars", "Business Category: Restaurants"]),
                        rng.choice(["Review Stars: 1.0", "Review Stars: 5.0"])])


def test_only_text_tokens_and_eos_carry_loss():
    tok = load_tokenizer(LM, log=None)
    split = TextSplit("train", ["good food", "ok"], None, None, ["Bars\tReview Stars: 5.0\n\n", "Bars\t1\n\n"])
    data = tokenize_lm(split, tok, max_length=64)
    batch = collate_lm([data[0], data[1]], tok.pad_token_id, num_rows=3)
    for i, (text, prefix) in enumerate(zip(split.texts, split.prefixes)):
        ids = prompt_ids(tok, prefix) + tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        n_prompt = len(prompt_ids(tok, prefix))
        assert batch["input_ids"][i, :len(ids)].tolist() == ids
        labels = batch["labels"][i]
        assert (labels[:n_prompt] == -100).all()                     # control codes: no loss
        assert labels[n_prompt:len(ids)].tolist() == ids[n_prompt:]  # the text and its EOS
        assert (labels[len(ids):] == -100).all()                     # padding: no loss
    assert batch["sample_mask"].tolist() == [1, 1, 0] and (batch["labels"][2] == -100).all()
    # The loss is the mean over exactly those tokens: a hand computation per example.
    model = load_causal_lm(LM, tok, seed=0)
    from dist_dpc.engine.losses import causal_lm_loss

    losses = causal_lm_loss(model, batch)
    for i in range(2):
        ids, start = data[i]["input_ids"], data[i]["loss_start"]
        logits = model(input_ids=torch.tensor([ids])).logits[0]
        nll = [-torch.log_softmax(logits[t - 1], -1)[ids[t]] for t in range(start, len(ids))]
        torch.testing.assert_close(losses[i], torch.stack(nll).mean(), rtol=1e-5, atol=1e-6)
    assert losses[2] == 0


def test_perplexity_with_strided_windows_equals_a_token_by_token_computation():
    tok = load_tokenizer(LM, log=None)
    model = load_causal_lm(LM, tok, seed=1).eval()
    context, stride = 8, 3
    task = make_task(LM, DataConfig(task="synthetic_sentiment", max_length=context, eval_stride=stride))
    split = TextSplit("validation", ["a", "short one", "a text much longer than the context window"], None, None,
                      ["x\n\n", "code\n\n", "y\n\n"])
    data = tokenize_lm(split, tok, max_length=None)
    assert max(len(data[i]["input_ids"]) for i in range(len(data))) > 3 * context
    nll, count = 0.0, 0
    with torch.no_grad():
        for i in range(len(data)):
            ids, start = data[i]["input_ids"], data[i]["loss_start"]
            ends = [min(b + context, len(ids)) for b in range(0, len(ids), stride)]
            for t in range(max(start, 1), len(ids)):
                k = next(k for k, e in enumerate(ends) if e > t)  # the first window that ends after t
                begin = k * stride
                assert begin < t  # every scored token has context in its window
                logits = model(input_ids=torch.tensor([ids[begin:t]])).logits[0, -1]
                nll -= float(torch.log_softmax(logits.double(), -1)[ids[t]])
                count += 1
    got = task.evaluate(model, data, tok.pad_token_id, batch_size=4)
    assert got["tokens"] == count
    assert math.isclose(got["perplexity"], math.exp(nll / count), rel_tol=1e-5)


@pytest.mark.timeout(900)
def test_dp_lora_zero3_two_ranks_trains_saves_merged_and_adapter_and_exports(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tests.engine.launch import torchrun

    write_yelp(tmp_path / "train.csv", 200, 0, "train")
    write_yelp(tmp_path / "test.csv", 30, 1, "test")
    data = ["data.task=yelp", f"data.train_file={tmp_path / 'train.csv'}", f"data.eval_file={tmp_path / 'test.csv'}"]
    common = [str(ROOT / "configs" / "debug_lm.yaml"), f"run.output_dir={tmp_path}", *data, "train.max_steps=3"]
    out = torchrun("dist_dpc/train.py", [*common, "run.name=z3", "train.zero_stage=3"], world_size=2, timeout=600)
    assert "world=2" in out.stdout and "zero_stage=3" in out.stdout
    results = json.loads((tmp_path / "z3" / "results.json").read_text())
    assert results["task"] == "causal_lm" and results["steps"] == 3 and 0 < results["epsilon"] <= 8
    assert math.isfinite(results["metrics"]["validation"]["perplexity"])
    saved = tmp_path / "z3" / "model"
    merged = AutoModelForCausalLM.from_pretrained(saved).eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    tok = load_tokenizer(ModelConfig(name=str(saved), task="causal_lm"), log=None)
    plain = ModelConfig(name="tiny-llama", task="causal_lm", lora=None)
    untrained = load_causal_lm(plain, tok, seed=0).eval()  # run.seed 0: the initial weights of the run
    adapted = PeftModel.from_pretrained(load_causal_lm(plain, tok, seed=0), saved / "adapter").eval()
    ids = torch.tensor([prompt_ids(tok, "Business Category: Bars\tReview Stars: 5.0\n\n")])
    with torch.no_grad():
        torch.testing.assert_close(adapted(input_ids=ids).logits, merged(input_ids=ids).logits, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(untrained(input_ids=ids).logits, merged(input_ids=ids).logits)  # adapters trained
    # A pipeline tree (single process): eval and export of the causal LM, reloaded by transformers.
    proc = dpc(["pipeline", *common, "run.name=tree", "pipeline.phases=[teacher, eval, export]"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    tree = tmp_path / "tree"
    exported = tree / "export" / "model"
    card = (exported / "README.md").read_text()
    assert "Causal language model" in card and "differential privacy" in card
    again = AutoModelForCausalLM.from_pretrained(exported).eval()
    generated = again.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    assert generated.shape == (1, ids.shape[1] + 5) and generated[0, :ids.shape[1]].tolist() == ids[0].tolist()
    eval_rows = json.loads((tree / "eval" / "results.json").read_text())["models"]
    assert eval_rows and "perplexity" in eval_rows[0]["metrics"]["validation"]


def test_bad_input_is_refused_with_the_field_and_the_fix(tmp_path):
    from dist_dpc.data import load_lm_task
    from dist_dpc.models.config import LoraSettings

    (tmp_path / "t.csv").write_text("body,label1\nhello,a\n")
    with pytest.raises(ValueError, match=r"data.text_column='text'.*columns are body, label1"):
        load_lm_task(DataConfig(task="csv", train_file=str(tmp_path / "t.csv")))
    with pytest.raises(ValueError, match=r"data.control_code_columns=\['label1', 'label2'\].*no column 'label2'"):
        load_lm_task(DataConfig(task="yelp", train_file=str(tmp_path / "t.csv"), text_column="body"))
    with pytest.raises(FileNotFoundError, match=r"model.name='/nowhere/m.gguf': no such GGUF file"):
        load_causal_lm(ModelConfig(name="/nowhere/m.gguf", task="causal_lm"))
    with pytest.raises(ValueError, match=r"model.lora.target_modules=\['nope'\].*q_proj"):
        load_causal_lm(ModelConfig(name="tiny-llama", task="causal_lm", lora=LoraSettings(target_modules=["nope"])))
    with pytest.raises(ValueError, match="tiny-bert.*encoder without an LM head"):
        load_causal_lm(ModelConfig(name="tiny-bert", task="causal_lm"))
    messages = []
    tok = load_tokenizer(LM, log=messages.append)
    assert tok.pad_token == tok.eos_token and "no pad token: padding with EOS" in messages[0]
    with pytest.raises(ValueError, match="model.task='generate'"):
        ModelConfig(name="tiny-llama", task="generate")
    from dist_dpc.data import load_task

    (tmp_path / "t.txt").write_text("one\ntwo\n")
    with pytest.raises(ValueError, match="data.task='text'.*for model.task=causal_lm"):
        load_task(DataConfig(task="text", train_file=str(tmp_path / "t.txt")))
    assert load_lm_task(DataConfig(task="text", train_file=str(tmp_path / "t.txt"))).train.texts == ["one", "two"]


@pytest.mark.timeout(600)
def test_dpimp_of_a_causal_lm(tmp_path):
    """Unstructured DPIMP of a DP-LoRA Llama teacher (adapters merged): two rounds to 50 %, the pruned
    matrices' kept weights training under DP-SGD with the masks enforced; the saved model is exactly
    50 % sparse at the last round's masks, and the ledger composes both phases. Tuning is refused."""
    from safetensors.torch import load_file

    proc = dpc(["pipeline", str(ROOT / "configs" / "debug_lm.yaml"), f"run.output_dir={tmp_path}", "run.name=p",
                "train.max_steps=3", "pipeline.phases=[teacher, prune, eval]",
                "pipeline.budget_split={teacher: 0.5, prune: 0.5}", "prune.rounds=2",
                "prune.trainable=['^(?!lm_head\\.|model\\.embed_tokens\\.)']"], timeout=500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "p"
    masks = torch.load(run / "prune" / "round2" / "masks.pt")
    weights = load_file(run / "prune" / "model" / "model.safetensors")
    teacher = load_file(run / "teacher" / "model" / "model.safetensors")
    assert sum(int((~m).sum()) for m in masks.values()) == round(0.5 * sum(m.numel() for m in masks.values()))
    for name, mask in masks.items():
        assert torch.count_nonzero(weights[name][~mask]) == 0, name
        assert bool((weights[name][mask] != teacher[name][mask]).any()), name  # the kept weights trained
    ledger = json.loads((run / "privacy_ledger.json").read_text())
    assert [e["status"] for e in ledger["phases"].values()] == ["completed", "completed"]
    rows = {r["phase"]: r for r in json.loads((run / "eval" / "results.json").read_text())["models"]}
    assert math.isfinite(rows["prune"]["metrics"]["validation"]["perplexity"])
    assert rows["prune"]["nonzero_parameters"] < rows["teacher"]["nonzero_parameters"]
    tune = dpc(["pipeline", str(ROOT / "configs" / "debug_lm.yaml"), f"run.output_dir={tmp_path}", "run.name=t",
                "pipeline.phases=[teacher, tune]", "tune.search={train.lr: [0.01, 0.001]}"])
    assert tune.returncode == 2 and "tune is not supported" in tune.stderr
    assert not (tmp_path / "t" / "teacher").exists()


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_mistral_and_qwen2_clip_per_sample_like_the_reference(family):
    """The other Llama-style families (their own RMSNorm classes): per-layer clipping in one backward
    (float64) equals explicit per-example gradients with the LM loss, clipped and summed."""
    import transformers

    from dist_dpc.engine.losses import causal_lm_loss
    from dist_dpc.privacy import ClipMode, PerSampleClipper
    from tests.engine.dp_worker import lm_batch
    from tests.reference import clipped_sum, lm_loss, per_example_grads

    config_cls, model_cls = {"mistral": ("MistralConfig", "MistralForCausalLM"),
                             "qwen2": ("Qwen2Config", "Qwen2ForCausalLM")}[family]
    config = getattr(transformers, config_cls)(vocab_size=257, hidden_size=32, intermediate_size=64,
                                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                               tie_word_embeddings=False)
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(config).double().eval()
    batch = lm_batch(257, 5, 9, 0)
    total = clipped_sum(model, per_example_grads(model, batch, lm_loss), 0.05, "per_layer")
    clipper = PerSampleClipper(model, 0.05).attach()
    model.zero_grad(set_to_none=True)
    with clipper.pass_mode(ClipMode.PER_LAYER, 5):
        causal_lm_loss(model, batch).sum().backward()
    clipper.detach()
    for name, expected in total.items():
        got = dict(model.named_parameters())[name].grad
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-9)


def test_freeze_embeddings_under_lora_finds_embeddings_by_type():
    from dist_dpc.models.config import LoraSettings

    for name, embeddings in (("tiny-llama", ("embed_tokens",)), ("tiny-gpt2", ("wte", "wpe"))):
        for freeze in (True, False):
            model = load_causal_lm(ModelConfig(name=name, task="causal_lm", lora=LoraSettings(r=2), trainable=[".*"],
                                               freeze_embeddings=freeze))
            trained = {n for n, p in model.named_parameters() if p.requires_grad}
            hit = [n for n in trained if any(e in n for e in embeddings)]
            assert (not hit) if freeze else len(hit) == len(embeddings), (name, freeze, hit)


def saved_tiny_llama(directory: Path) -> Path:
    tok = load_tokenizer(LM, log=None)
    load_causal_lm(LM, tok, seed=0).save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


def rms_norm_self_test(model) -> None:
    """The engine's start-up self-test on a model whose only trainable weights are its RMSNorms."""
    from dist_dpc.privacy import PerSampleClipper, check_no_bypass

    clipper = PerSampleClipper(model, 1.0).attach()
    model.eval()
    model.train()  # what evaluation between steps does; transformers >= 5.25 may kernelize here
    ids = torch.randint(3, 200, (4, 12))
    check_no_bypass(clipper, model, lambda: model(input_ids=ids, labels=ids).loss * 4, 4)


def test_pretrained_causal_lm_keeps_its_dp_rms_norms_across_train_and_eval(tmp_path):
    # transformers 5.25 loads with hub kernels on when the `kernels` package is installed; its
    # kernelize (on every train()/eval() mode change) deleted the DP forward of each LlamaRMSNorm.
    # Our loader turns them off, so a trainable RMSNorm stays a DP layer.
    directory = saved_tiny_llama(tmp_path / "tiny")
    model = load_causal_lm(ModelConfig(name=str(directory), task="causal_lm", trainable=["norm"]))
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        "model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight",
        "model.layers.1.input_layernorm.weight", "model.layers.1.post_attention_layernorm.weight", "model.norm.weight"}
    rms_norm_self_test(model)


def test_hub_kernels_rewriting_a_dp_forward_are_refused(tmp_path):
    # The real `kernels` library (a transformers >= 5.25 dependency): a model loaded the default way
    # (hub kernels on) is refused up front; one whose forwards kernelize rewrites after the clipper
    # attached is refused at the next DP pass.
    kernels = pytest.importorskip("kernels")
    from transformers import AutoModelForCausalLM

    from dist_dpc.privacy import ClipMode, DetachedLayerError, PerSampleClipper

    directory = saved_tiny_llama(tmp_path / "tiny")
    default = AutoModelForCausalLM.from_pretrained(directory)
    if default.use_kernels:  # transformers 5.25's default with `kernels` installed
        with pytest.raises(DetachedLayerError, match="use_kernels=False"):
            PerSampleClipper(default, 1.0)
    model = AutoModelForCausalLM.from_pretrained(directory, use_kernels=False)
    for name, p in model.named_parameters():
        p.requires_grad_("norm" in name)
    clipper = PerSampleClipper(model, 1.0).attach()
    kernels.kernelize(model, mode=kernels.Mode.TRAINING, device="cpu", use_fallback=True)
    with pytest.raises(DetachedLayerError) as info:
        with clipper.pass_mode(ClipMode.PER_LAYER, 4):
            pass
    assert "model.layers.0.input_layernorm" in str(info.value)


def test_loaders_turn_hub_kernels_off(tmp_path):
    from dist_dpc.models.loading import load_sequence_classifier

    directory = saved_tiny_llama(tmp_path / "tiny")
    lm = load_causal_lm(ModelConfig(name=str(directory), task="causal_lm", trainable=["norm"]))
    classifier = load_sequence_classifier(ModelConfig(name=str(directory)), num_labels=2)
    assert lm.use_kernels is False and classifier.use_kernels is False
