"""DP-SGD in your own DeepSpeed loop: fine-tune a Hugging Face classifier on a CSV (text,label).

    deepspeed --num_gpus 2 examples/deepspeed_loop.py --model bert-base-uncased --train_file train.csv
"""
import argparse

import datasets
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import dist_dpc

parser = argparse.ArgumentParser()
parser.add_argument("--model", default="bert-base-uncased")
parser.add_argument("--train_file", required=True)
parser.add_argument("--deepspeed_config", default="examples/ds_config.json")  # train_batch_size: expected batch
parser.add_argument("--epsilon", type=float, default=3.0)
parser.add_argument("--epochs", type=float, default=3)
parser.add_argument("--output_dir", default="dp_model")
parser.add_argument("--ledger", default="privacy_ledger.json")  # one per private data set: keep it across runs
parser.add_argument("--public_model", action="store_true")  # --model is a local copy of a public model
parser.add_argument("--local_rank", type=int, default=0)  # set by the deepspeed launcher
args = parser.parse_args()

tokenizer = AutoTokenizer.from_pretrained(args.model)
data = datasets.load_dataset("csv", data_files=args.train_file)["train"]
data = data.map(lambda b: tokenizer(b["text"], truncation=True, max_length=64, padding="max_length"), batched=True)
data = data.rename_column("label", "labels").with_format("torch", columns=["input_ids", "attention_mask", "labels"])
model = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=2, use_kernels=False)

engine, optimizer, loader, _ = dist_dpc.initialize(
    model=model, config=args.deepspeed_config, training_data=data, epochs=args.epochs,
    privacy=dist_dpc.PrivacyConfig(target_epsilon=args.epsilon, max_grad_norm=1.0,  # a local --model must be
                                   public_model_dirs=[args.model] if args.public_model else []),  # declared public
    ledger=args.ledger)
for batch in loader:  # one Poisson-sampled logical batch per step
    engine.train_batch(batch)  # returns exact batch statistics: for debugging, never to log (not noised)
    if torch.distributed.get_rank() == 0 and engine.steps_done % 10 == 0:
        print(f"step {engine.steps_done}/{loader.steps}")
epsilon = engine.finish()  # the ledger now counts the steps taken
engine.save_pretrained(args.output_dir, tokenizer)  # with its privacy lineage
if torch.distributed.get_rank() == 0:
    print(f"saved {args.output_dir}: epsilon {epsilon:.3f}, delta {engine.ledger.delta:.3g}")
