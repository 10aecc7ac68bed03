"""head_init: the centred pooler keeps the HF architecture, its DP mean and probe are in the ledger
(composed like opacus' PRV), and a restarted phase reloads the head instead of reading the data again."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from dist_dpc.models import ModelConfig, load_sequence_classifier
from dist_dpc.models.heads import centre_pooler_, pooled_head
from dist_dpc.privacy.randomness import SecretKey
from tests.pipeline.test_phases import CONFIG, TINY, ok, opacus_prv_epsilon
from tests.pipeline.test_train import dpc


def test_centred_pooler_is_tanh_of_cls_minus_mean_and_reloads_with_from_pretrained(tmp_path):
    model = load_sequence_classifier(ModelConfig(name="tiny-bert", dropout=0.0), 2).eval()
    head = pooled_head(model, "head_init.centre_pooler")
    mean = torch.randn(head.hidden_size)
    centre_pooler_(head, mean)
    hidden = torch.randn(3, 5, head.hidden_size)
    torch.testing.assert_close(model.bert.pooler(hidden), torch.tanh(hidden[:, 0] - mean))
    model.save_pretrained(tmp_path)
    again = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    ids = torch.randint(1, 100, (2, 6))
    torch.testing.assert_close(again(input_ids=ids).logits, model(input_ids=ids).logits)


def test_head_of_a_dp_lora_model_is_the_wrapped_models_own():
    from dist_dpc.models.config import LoraSettings

    model = load_sequence_classifier(ModelConfig(name="tiny-bert", dropout=0.0, lora=LoraSettings(r=2)), 2).eval()
    head = pooled_head(model, "head_init.centre_pooler")
    inner = model.get_base_model()
    assert head.pooler is inner.bert.pooler and head.classifier is inner.classifier
    # The features head_init reads pass through the adapters (which sit inside the encoder).
    ids = torch.randint(1, 100, (2, 6))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_()
        expected = inner.bert(input_ids=ids).last_hidden_state[:, 0]
        torch.testing.assert_close(head.encoder(input_ids=ids).last_hidden_state[:, 0], expected)
        adapters_off = model.get_base_model()
        with model.disable_adapter():
            plain = adapters_off.bert(input_ids=ids).last_hidden_state[:, 0]
    assert not torch.allclose(plain, expected)


def test_models_without_a_pooler_are_refused_naming_the_setting():
    model = load_sequence_classifier(ModelConfig(name="tiny-gpt2"), 2)
    with pytest.raises(ValueError, match="head_init.centre_pooler.*set head_init.centre_pooler off"):
        pooled_head(model, "head_init.centre_pooler")


@pytest.mark.timeout(900)
def test_pipeline_records_mean_and_probe_and_a_restart_reloads_the_head(tmp_path):
    overrides = [*TINY, "pipeline.phases=[teacher,distill,eval]", "privacy.target_epsilon=8",
                 "head_init.centre_pooler=true", "head_init.probe_epochs=1", "wandb.mode=disabled"]
    ok(dpc(["pipeline", CONFIG, f"run.output_dir={tmp_path}", "run.name=h", *overrides], timeout=800))
    run = tmp_path / "h"
    ledger = json.loads((run / "privacy_ledger.json").read_text())
    probe_steps = 10  # 1 epoch of 240 examples at batch 24
    mechanisms = []
    for phase in ("teacher", "distill"):
        results = json.loads((run / phase / "results.json").read_text())
        entry = ledger["phases"][phase]["mechanisms"]
        # the DP mean (fixed sigma, q = 1), then the probe's and the fine-tuning's steps at one sigma and q
        # the DP mean's default sigma is scaled to N within [5, 20]: N = 240 gives the floor
        assert [(m["noise_multiplier"], m["sample_rate"], m["steps"]) for m in entry] == [
            (5.0, 1.0, 1), (results["noise_multiplier"], results["sample_rate"], probe_steps + results["steps"])]
        assert results["head_init"]["probe"]["steps"] == probe_steps
        assert results["head_init"]["probe"]["noise_multiplier"] == results["noise_multiplier"]
        assert (run / phase / "head_init.pt").is_file()
        mechanisms += entry
    total = ledger_total = json.loads((run / "distill" / "results.json").read_text())["epsilon"]
    assert ledger_total == pytest.approx(8.0, rel=0.01)  # calibrated to the target, mean and probe included
    assert total == pytest.approx(opacus_prv_epsilon(mechanisms, ledger["delta"]), rel=0.02)

    # The centred pooler's identity weight stayed frozen through DP fine-tuning; its bias trained.
    from safetensors.torch import load_file

    trained = load_file(run / "teacher" / "model" / "model.safetensors")
    start = torch.load(run / "teacher" / "head_init.pt", weights_only=True)["pooler"]
    assert torch.equal(trained["bert.pooler.dense.weight"], torch.eye(start["dense.weight"].shape[0]))
    assert not torch.equal(trained["bert.pooler.dense.bias"], start["dense.bias"])

    ok(dpc(["report", str(run)]))
    report = (run / "report" / "privacy_report.md").read_text()
    assert "| teacher | completed | poisson | 5.0000 | 1 | 1 |" in report
    assert "Rows with q = 1 are head_init's DP mean" in report and "DP linear probe" in report

    # A restart finds head_init.pt and loads it: ctx has no training data, so reading it would fail.
    from dist_dpc.engine import init_distributed
    from dist_dpc.pipeline.config import load_config
    from dist_dpc.pipeline.head_init import initialise_head

    cfg = load_config(CONFIG, [*overrides, f"run.output_dir={tmp_path}", "run.name=h"])
    ctx = SimpleNamespace(cfg=cfg, world=init_distributed(), phase="teacher", train_set=None, tokenizer=None)
    model = load_sequence_classifier(ModelConfig(name="tiny-bert", dropout=0.0), 2)
    info = initialise_head(ctx, model, cfg.head_init, directory=run / "teacher", steps=10, key=SecretKey.from_seed(0))
    saved = torch.load(run / "teacher" / "head_init.pt", weights_only=True)
    assert info == saved["info"]
    torch.testing.assert_close(model.bert.pooler.state_dict(), saved["pooler"])
    torch.testing.assert_close(model.classifier.state_dict(), saved["classifier"])
    # and what it saved is the centred pooler: identity weights (the bias is minus the DP mean)
    torch.testing.assert_close(saved["pooler"]["dense.weight"], torch.eye(model.config.hidden_size))


@pytest.mark.timeout(900)
def test_prune_rounds_each_record_their_head_start_and_the_last_round_counts_them_all(tmp_path):
    # Every round centres and probes its own pruned model: the ledger has one DP mean per round (two
    # releases of the same Gaussian mechanism: one entry of 2 steps) and one DP-SGD mechanism for all
    # the rounds' probe and fine-tuning steps, each released as it happened. The last round's engine
    # starts from the earlier rounds as its prior, so its epsilon must equal the ledger's total.
    base = [*TINY, "head_init.centre_pooler=true", "head_init.probe_epochs=1", "wandb.mode=disabled"]
    ok(dpc(["pipeline", CONFIG, f"run.output_dir={tmp_path}", "run.name=t", *base, "pipeline.phases=[teacher]",
            "privacy.target_epsilon=4"], timeout=400))
    ok(dpc(["pipeline", CONFIG, f"run.output_dir={tmp_path}", "run.name=p", *base, "pipeline.phases=[prune]",
            "pipeline.budget_split={}", "privacy.target_epsilon=8", "prune.method=unstructured", "prune.rounds=2",
            f"prune.source={tmp_path / 't' / 'teacher' / 'model'}"], timeout=600))
    ledger = json.loads((tmp_path / "p" / "privacy_ledger.json").read_text())
    results = json.loads((tmp_path / "p" / "prune" / "results.json").read_text())
    probe_steps = 10  # 1 epoch of 240 examples at batch 24, in each round
    assert [(m["noise_multiplier"], m["sample_rate"], m["steps"]) for m in ledger["phases"]["prune"]["mechanisms"]] == [
        (5.0, 1.0, 2), (results["noise_multiplier"], results["sample_rate"], 2 * probe_steps + results["steps"])]
    released = [(m["noise_multiplier"], m["steps"]) for m in ledger["phases"]["prune"]["released"]]
    round_steps = results["steps"] // 2
    assert released == [(5.0, 1), (results["noise_multiplier"], probe_steps), (results["noise_multiplier"], round_steps)] * 2
    everything = [m for entry in ledger["phases"].values() for m in entry["mechanisms"]]
    assert results["epsilon"] == pytest.approx(opacus_prv_epsilon(everything, ledger["delta"]), rel=0.02)
    assert results["epsilon"] == pytest.approx(8.0, rel=0.01)
    for r in (1, 2):
        assert (tmp_path / "p" / "prune" / f"round{r}" / "head_init.pt").is_file()


def test_default_dp_mean_noise_is_scaled_to_n_within_its_bounds():
    """0.06 N / sqrt(d) clamped to [5, 20]: the noise on the mean has norm ~0.06 R (in expectation
    sigma R sqrt(d) / N) wherever the clamp does not bind."""
    import math

    from dist_dpc.pipeline.config import HeadInitConfig, mean_noise_for

    assert mean_noise_for(240, 32) == 5.0 and mean_noise_for(100_000, 384) == 20.0
    sigma = mean_noise_for(4500, 384)
    assert sigma == pytest.approx(13.78, abs=0.01) and sigma * math.sqrt(384) / 4500 == pytest.approx(0.06)
    h = HeadInitConfig().resolved(True, "x", dataset_size=2000, hidden_size=384)
    assert h.mean_noise_multiplier == pytest.approx(0.06 * 2000 / math.sqrt(384))
    assert HeadInitConfig(mean_noise_multiplier=20.0).resolved(True, "x", dataset_size=2000,
                                                              hidden_size=384).mean_noise_multiplier == 20.0
    with pytest.raises(ValueError, match="head_init.mean_noise_multiplier=null is scaled to N"):
        HeadInitConfig().resolved(True, "x")
