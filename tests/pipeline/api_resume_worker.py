"""A user's run of dist_dpc.initialize that dies (os._exit) after a checkpoint: 2 DP steps, a checkpoint
at step 2, the weights at that point kept for the test, one more step, optionally a saved model, then
the process is gone without finish(). Args: LEDGER CHECKPOINT_DIR WEIGHTS_FILE SAVE_MODEL_DIR|-"""

import os
import sys

import torch

import dist_dpc
from tests.pipeline.test_api import config, examples, model


def main() -> None:
    ledger, checkpoints, weights, saved = sys.argv[1:5]
    engine, _, loader, _ = dist_dpc.initialize(model=model(), config=config(), training_data=examples(), steps=6,
                                               privacy=dist_dpc.PrivacyConfig(target_epsilon=4.0, max_effective_noise=None),
                                               ledger=ledger)
    batches = iter(loader)
    for _ in range(2):
        engine.train_batch(next(batches))
    engine.save_checkpoint(checkpoints, "two")
    torch.save({n: p.detach().clone() for n, p in engine.module.named_parameters()}, weights)
    engine.train_batch(next(batches))
    if saved != "-":
        engine.save_pretrained(saved)
    sys.stdout.flush()
    os._exit(3)  # killed: no finish(), the entry stays running with its whole plan counted


if __name__ == "__main__":
    main()
