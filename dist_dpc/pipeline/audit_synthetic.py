"""Do the black-box audit's canary secrets appear in synthetic text? (`audit.synthetic_samples`)

In the synthetic-text path (docs/generative.md) what is released is text the DP teacher wrote. The
black-box audit of a causal LM already trains the user's recipe with m random secrets ("my secret
code is 3 1 4 ...") of which each was included with probability 1/2. With `audit.synthetic_samples`
= n, the audit tree's trained model then writes n samples with the config's sampling settings (its
`generate.prompts`, scaled to n, or unconditional samples), and every canary is scored on that text
alone: the longest run of its secret's digits found in any sample (ties: in how many samples). The
report says how many included and how many excluded canaries' secrets appear whole, and the one-run
lower bound on epsilon from these text-only scores, against the tree's claimed epsilon.

The samples are post-processing of the audit model: they stay in the audit tree (never released).
"""

from __future__ import annotations

import json
import re

import numpy as np
import torch

from dist_dpc.pipeline.generate import plan_batches, sample_batch
from dist_dpc.utils.atomic import atomic_write
from dist_dpc.utils.logging import log

SECRET_DIGITS = 10


def secret_of(text: str) -> str:
    """The digits of a canary's secret text ("3 1 4 ..." -> "314...")."""
    return re.sub(r"\D", "", text)


def exposure_scores(secrets: list[str], texts: list[str]) -> np.ndarray:
    """Per secret: L + s / (s + 1), L the longest substring of the secret's digits found in the digit
    stream of any text (all non-digits removed, so spacing and punctuation do not hide a secret), s the
    number of texts holding such a substring of length L (0 when L = 0). A function of the text alone."""
    streams = [re.sub(r"\D", "", t) for t in texts]
    longest = max((len(s) for s in secrets), default=0)
    seen: list[dict[str, int]] = [dict() for _ in range(longest + 1)]  # length -> substring -> texts
    for stream in streams:
        for length in range(1, longest + 1):
            for sub in {stream[i:i + length] for i in range(len(stream) - length + 1)}:
                seen[length][sub] = seen[length].get(sub, 0) + 1
    scores = np.zeros(len(secrets))
    for k, secret in enumerate(secrets):
        for length in range(len(secret), 0, -1):
            counts = [seen[length].get(secret[i:i + length], 0) for i in range(len(secret) - length + 1)]
            if max(counts, default=0):
                best = max(counts)
                scores[k] = length + best / (best + 1)
                break
    return scores


def allocate(prompts: dict[str, int], n: int) -> list[tuple[tuple[str, ...], int]]:
    """``prompts`` (control codes -> count) scaled to n samples by largest remainder; none: n samples
    without control codes."""
    if not prompts or sum(prompts.values()) == 0:
        return [((), n)]
    total = sum(prompts.values())
    keys = list(prompts)
    exact = [n * prompts[k] / total for k in keys]
    counts = [int(e) for e in exact]
    for i in sorted(range(len(keys)), key=lambda i: (counts[i] - exact[i], i))[:n - sum(counts)]:
        counts[i] += 1
    return [(tuple(k.split("\t")) if k else (), c) for k, c in zip(keys, counts) if c]


def synthetic_exposure(ctx, module: torch.nn.Module, canary_texts: list[str], included: np.ndarray,
                       zero_stage: int) -> tuple[dict, np.ndarray]:
    """Generate ``audit.synthetic_samples`` texts from the trained audit model and score every canary
    on them. Ranks share the batches; at ZeRO 3 every rank runs as many batches (a spare one repeats
    and is discarded) with synced generation, as each forward is a collective."""
    cfg, world = ctx.cfg, ctx.world
    n = cfg.audit.synthetic_samples
    batches = plan_batches(allocate(cfg.generate.prompts, n), cfg.generate.batch_size)
    per_rank = -(-len(batches) // world.world_size)
    mine = batches[world.rank::world.world_size]
    synced = zero_stage == 3 and world.world_size > 1
    was_training = module.training
    module.eval()
    rows = []
    for i in range(per_rank):
        out = sample_batch(module, ctx.tokenizer, cfg.generate, mine[min(i, len(mine) - 1)] if mine else batches[0],
                           synced=synced)
        if i < len(mine):
            rows.extend(out)
    module.train(was_training)
    if torch.distributed.is_initialized() and world.world_size > 1:
        shares = [None] * world.world_size
        torch.distributed.all_gather_object(shares, rows)
        rows = [r for share in shares for r in share]
    rows.sort(key=lambda r: r["id"])
    secrets = [secret_of(t) for t in canary_texts]
    scores = exposure_scores(secrets, [r["text"] for r in rows])
    whole = scores >= SECRET_DIGITS
    if ctx.is_main:
        atomic_write(ctx.directory / "synthetic.jsonl",
                     lambda tmp: tmp.write_text("".join(json.dumps(r) + "\n" for r in rows)))
    summary = {"samples": len(rows), "secrets_whole_included": int((whole & included).sum()),
               "secrets_whole_excluded": int((whole & ~included).sum()),
               "longest_run_included_mean": float(np.floor(scores[included]).mean()) if included.any() else 0.0,
               "longest_run_excluded_mean": float(np.floor(scores[~included]).mean()) if (~included).any() else 0.0}
    log(world, f"[audit] synthetic text: {len(rows)} samples; whole secrets of {summary['secrets_whole_included']} "
               f"included and {summary['secrets_whole_excluded']} excluded canaries appear")
    return summary, scores
