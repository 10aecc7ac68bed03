"""One rank of the partitioned-model checks (torchrun, gloo): a saved tiny BERT classifier built under
deepspeed.zero.Init (transformers' HfDeepSpeedConfig, as the pipeline does at ZeRO 3) next to the same
directory loaded whole; what engine.partitioned computes on the first must equal plain torch on the
second. Args: MODEL_DIR OUT."""

import sys

import torch

from dist_dpc.compress.pruning import apply_masks, compute_masks, sparsity_stats
from dist_dpc.engine import build_ds_config, init_distributed
from dist_dpc.engine.partitioned import (full_numel, gathered_forward, gathered_state_dict, is_partitioned,
                                         one_at_a_time, whole)


def main() -> None:
    from transformers import AutoModelForSequenceClassification
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    model_dir, out = sys.argv[1], sys.argv[2]
    world = init_distributed()
    ds = build_ds_config(None, micro_batch_size=4, world_size=world.world_size, zero_stage=3, lr=1e-3,
                         weight_decay=0.0, optimizer="adamw", bf16=False, dp_enabled=True)
    setting = HfDeepSpeedConfig(ds)
    parted = AutoModelForSequenceClassification.from_pretrained(model_dir, use_kernels=False).eval()
    unset_hf_deepspeed_config()
    del setting
    plain = AutoModelForSequenceClassification.from_pretrained(model_dir, use_kernels=False).eval()
    report = {"all_partitioned": all(is_partitioned(p) for p in parted.parameters()),
              "local": sum(p.ds_tensor.numel() for p in parted.parameters()),
              "whole": sum(full_numel(p) for p in parted.parameters()),
              "plain_numel": sum(p.numel() for p in plain.parameters())}
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(5, 1000, (3, 7), generator=g)
    with torch.no_grad(), gathered_forward(parted):
        report["logits"] = parted(input_ids=ids).logits
    report["placeholders_after_forward"] = all(p.numel() == 0 for p in parted.parameters())
    with torch.no_grad():
        report["plain_logits"] = plain(input_ids=ids).logits
    # one_at_a_time: whole tensors inside, placeholders again after
    sizes = [p.numel() for _, p in one_at_a_time(parted.named_parameters())]
    report["one_at_a_time_sizes"] = sizes == [p.numel() for p in plain.parameters()]
    report["parted_state"] = gathered_state_dict(parted, keep=world.rank == 0)
    report["plain_state"] = {k: v.clone() for k, v in plain.state_dict().items()}
    for method, sparsity in (("unstructured", 0.5), ("2:4", 0.0)):
        report[f"masks_{method}"] = compute_masks(parted, method, sparsity)
        report[f"plain_masks_{method}"] = compute_masks(plain, method, sparsity)
    apply_masks(parted, report["masks_unstructured"])
    apply_masks(plain, report["plain_masks_unstructured"])
    report["stats"], report["plain_stats"] = sparsity_stats(parted), sparsity_stats(plain)
    # modify=True: what rank 0 writes becomes every rank's; a different value elsewhere is overwritten
    bias = parted.classifier.bias
    with whole([bias], modify=True), torch.no_grad():
        bias.fill_(float(world.rank + 1))
    with whole([bias]):
        seen = bias.detach().clone()
    every = [torch.zeros_like(seen) for _ in range(world.world_size)]
    torch.distributed.all_gather(every, seen)
    report["bias_seen"] = torch.stack(every)
    report["masked_state"] = gathered_state_dict(parted, keep=world.rank == 0)
    report["plain_masked_state"] = plain.state_dict()
    if world.rank == 0:
        torch.save(report, out)


if __name__ == "__main__":
    main()
