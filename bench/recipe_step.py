"""The recipe's DP step (per_layer, C 1) against the non-DP step, side by side in one process:
MiniLM on 512 SST-2 training sentences (a seeded subset, data.max_train_samples), 8 micro-batches of
64 (48 tokens at most), loaded and tokenized by dist_dpc.data as the phases do.

    python bench/recipe_step.py bitfit|lora [DROPOUT] [profile]

DROPOUT: model.dropout (default: the pre-trained 0.1); a third argument prints torch.profiler's top
ops of one DP step. Prints the best of 3 steps each (after one warm-up) and their ratio.
Run 2026-12-05 on the 2-core CPU (docs/RESULTS.md): bitfit 6.5 / 6.0 s (1.08x), lora 6.1-6.6 / 6.2 s
(1.00x) at dropout 0.1; bitfit 5.0 / 4.15 s (1.21x) at dropout 0 (a second run, minutes later). Those runs
read the first 512 training rows by hand; the seeded subset has other lengths, so compare ratios, not seconds.
"""
import sys
import time
import torch
from dist_dpc.engine import DPEngine, build_ds_config, init_distributed
from dist_dpc.privacy import PrivacyConfig
from dist_dpc.privacy.randomness import SecretKey
from dist_dpc.models import ModelConfig, load_sequence_classifier, load_tokenizer
from dist_dpc.models.config import LoraSettings
from dist_dpc.engine.losses import sequence_classification_loss
from dist_dpc.compress.config import BITFIT
from dist_dpc.data import DataConfig, collate, load_task, tokenize_split

mode = sys.argv[1]  # bitfit | lora
world = init_distributed()
drop = float(sys.argv[2]) if len(sys.argv) > 2 else None
cfgm = ModelConfig(name="minilm", dropout=drop, trainable=BITFIT if mode == "bitfit" else None, freeze_embeddings=True,
                   lora=LoraSettings() if mode == "lora" else None)
tok = load_tokenizer(cfgm, log=None)
# The loaders every phase uses: SST-2 from the local GLUE copy, a seeded subset, tokenized as the phases do.
data = load_task(DataConfig(task="sst2", data_dir="../shared/data/glue", max_train_samples=512, max_length=48))
examples = tokenize_split(data.train, tok, 48)
micro = [collate([examples[j] for j in range(i * 64, (i + 1) * 64)], tok.pad_token_id, num_rows=64) for i in range(8)]
out = {}
for private in [True, False]:
    model = load_sequence_classifier(cfgm, 2, tok, seed=0)
    ds = build_ds_config({"zero_optimization": {"stage": 0}}, micro_batch_size=64, world_size=1, zero_stage=0, lr=1e-3,
                         weight_decay=0.0, optimizer="adamw", bf16=False, dp_enabled=private)
    privacy = PrivacyConfig(enabled=private, target_epsilon=None, noise_multiplier=1.0 if private else 0.0, delta=1e-5,
                            max_grad_norm=1.0, clipping="per_layer")
    engine = DPEngine(model, ds, privacy, dataset_size=20000, expected_batch_size=512, planned_steps=10,
                      loss_fn=sequence_classification_loss, world=world, key=SecretKey.from_seed(0))
    engine.train_step(micro, 512)
    ts = []
    for _ in range(3):
        t = time.perf_counter(); engine.train_step(micro, 512); ts.append(time.perf_counter() - t)
    out[private] = min(ts)
    print(mode, "DP" if private else "non-DP", ["%.2f" % t for t in ts], flush=True)
    if private and len(sys.argv) > 3:
        from torch.profiler import profile, ProfilerActivity
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            engine.train_step(micro, 512)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
print(mode, "ratio DP/non-DP %.3f" % (out[True] / out[False]))
