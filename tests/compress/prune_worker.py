"""One rank of a pruned DP fine-tune under DeepSpeed (torchrun, gloo): tiny-bert pruned to 50 %
(unstructured or 2:4) from the same seed on every rank, a few noisy DP steps with the masks enforced,
then the gathered weights and the masks written by rank 0. Args: OUT ZERO_STAGE BF16(0/1) METHOD LABELS.
Embeddings are frozen, so the ranks' partitions split the encoder's prunable matrices between them."""

import sys

import torch

from dist_dpc.compress.pruning import MaskEnforcer, apply_masks, compute_masks
from dist_dpc.engine import DPEngine, build_ds_config, init_distributed
from dist_dpc.engine.losses import sequence_classification_loss
from dist_dpc.models import ModelConfig, load_sequence_classifier
from dist_dpc.privacy import PrivacyConfig
from dist_dpc.privacy.randomness import SecretKey
from tests.engine.dp_worker import full_params


def main() -> None:
    out, stage, bf16, method, labels = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1", sys.argv[4], int(sys.argv[5])
    world = init_distributed()
    model = load_sequence_classifier(ModelConfig(name="tiny-bert", dropout=0.0), labels, None, seed=0)
    for name, param in model.named_parameters():
        param.requires_grad_("embeddings" not in name)
    masks = compute_masks(model, method, 0.5)
    apply_masks(model, masks)
    enforcer = MaskEnforcer(model, masks)
    ds = build_ds_config(None, micro_batch_size=4, world_size=world.world_size, zero_stage=stage, lr=1e-2,
                         weight_decay=0.1, optimizer="adamw", bf16=bf16, dp_enabled=True)
    engine = DPEngine(model, ds, PrivacyConfig(target_epsilon=None, noise_multiplier=1.0, delta=1e-5),
                      dataset_size=1000, expected_batch_size=8, planned_steps=10, loss_fn=sequence_classification_loss,
                      world=world, key=SecretKey.from_seed(3))
    enforcer.bind(engine)
    g = torch.Generator().manual_seed(100 + world.rank)
    for _ in range(3):
        batch = {"input_ids": torch.randint(0, 1000, (4, 6), generator=g),
                 "attention_mask": torch.ones(4, 6, dtype=torch.long),
                 "token_type_ids": torch.zeros(4, 6, dtype=torch.long),
                 "labels": torch.randint(0, labels, (4,), generator=g), "sample_mask": torch.ones(4)}
        engine.train_step([batch], 8)
    violations = torch.tensor([float(enforcer.violations())])
    torch.distributed.all_reduce(violations)
    params = full_params(engine)
    if world.rank == 0:
        torch.save({"masks": masks, "params": params, "violations": int(violations.item()),
                    "partitioned": enforcer.partitions is not None,
                    "partition_mask_dtypes": sorted({str(m.dtype) for _, m in (enforcer.partitions or {}).values()})}, out)


if __name__ == "__main__":
    main()
