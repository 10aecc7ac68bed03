"""A user's run of dist_dpc.initialize that dies (os._exit) after a checkpoint: 2 DP steps, a checkpoint
at step 2 (tag "two"), one more step, then by MODE: "plain" nothing, "model" a saved model, "checkpoint" a
second checkpoint (tag "three"), "hold" a line READY and a wait to be killed (it holds the entry); then
the process is gone without finish(). The weights at steps 2 and 3 are kept for the test.
Args: LEDGER CHECKPOINT_DIR OUT_DIR MODE"""

import os
import sys
import time
from pathlib import Path

import torch

import dist_dpc
from dist_dpc.privacy.randomness import SecretKey
from tests.pipeline.test_api import config, examples, model

KEY_SEED = 7  # a fixed key=: a resume with the same key must still draw fresh noise


def main() -> None:
    ledger, checkpoints, out, mode = sys.argv[1], sys.argv[2], Path(sys.argv[3]), sys.argv[4]
    engine, _, loader, _ = dist_dpc.initialize(model=model(), config=config(), training_data=examples(), steps=6,
                                               privacy=dist_dpc.PrivacyConfig(target_epsilon=4.0, max_effective_noise=None),
                                               ledger=ledger, key=SecretKey.from_seed(KEY_SEED))
    batches = iter(loader)
    for _ in range(2):
        engine.train_batch(next(batches))
    engine.save_checkpoint(checkpoints, "two")
    torch.save({n: p.detach().clone() for n, p in engine.module.named_parameters()}, out / "at_step2.pt")
    engine.train_batch(next(batches))
    torch.save({n: p.detach().clone() for n, p in engine.module.named_parameters()}, out / "at_step3.pt")
    if mode == "model":
        engine.save_pretrained(out / "model")
    elif mode == "checkpoint":
        engine.save_checkpoint(checkpoints, "three")
    elif mode == "hold":
        print("READY", flush=True)
        time.sleep(300)
    sys.stdout.flush()
    os._exit(3)  # killed: no finish(), the entry stays running with its whole plan counted


if __name__ == "__main__":
    main()
