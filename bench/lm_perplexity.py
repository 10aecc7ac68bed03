"""Perplexity of a causal LM on a run config's evaluation split (the task's windows and token weighting),
e.g. the pre-trained model before a DP fine-tune of the same config.

  python bench/lm_perplexity.py CONFIG [overrides...] [--model DIR_OR_NAME] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--model", help="model to score (default: the config's model.name, untrained)")
    p.add_argument("--json")
    a = p.parse_args()
    import dataclasses

    from dist_dpc.models import load_tokenizer
    from dist_dpc.pipeline.config import load_config
    from dist_dpc.tasks import make_task

    cfg = load_config(a.config, a.overrides)
    model_cfg = dataclasses.replace(cfg.model, lora=None, name=a.model or cfg.model.name)
    task = make_task(model_cfg, cfg.data)
    tok = load_tokenizer(model_cfg, log=None)
    data = task.load_data()  # the evaluation split is scored; the training split is not read beyond loading
    split = next(iter(data.eval.values()))
    model = task.load_model(model_cfg, tok, num_labels=None, label_names=None, seed=cfg.run.seed)
    metrics = task.evaluate(model, task.tokenize(split, tok, None, train=False), tok.pad_token_id,
                            cfg.train.eval_batch_size)
    print(json.dumps({"model": model_cfg.name, **metrics}))
    if a.json:
        Path(a.json).write_text(json.dumps({"model": model_cfg.name, **metrics}, indent=2))


if __name__ == "__main__":
    main()
