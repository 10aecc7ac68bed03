"""One rank of the distributed magnitude ranking (torchrun, gloo): every rank builds the same heavily
tied weights and an earlier round's masks, calls global_magnitude_masks, and rank 0 writes the
masks it got. Args: OUT."""

import sys

import torch

from dist_dpc.compress.pruning import global_magnitude_masks
from tests.compress.test_pruning import tied_weights


def main() -> None:
    torch.distributed.init_process_group("gloo")
    weights, previous = tied_weights()
    masks = {sparsity: global_magnitude_masks(weights, sparsity, previous) for sparsity in (0.3, 0.55)}
    if torch.distributed.get_rank() == 0:
        torch.save(masks, sys.argv[1])
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
