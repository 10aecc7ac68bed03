"""Why a DPKD student collapses right after head_init (docs/RESULTS.md, demo-set collapse): rebuild the
student of a tree (teacher layers [0, 2, 4], the centred pooler of its distill/head_init.pt), measure
the constant offset of its pooled features and run the DP probe from the inherited head and from zero,
Adam and SGD, on a few noise draws; scored on the generated set's validation split (a diagnostic, not a
choice of settings).

  python bench/student_probe_diag.py runs/kd_diag/A      # a tree made with the demo's data settings
"""
import sys

import torch
from dist_dpc.models import ModelConfig, load_sequence_classifier, load_tokenizer
from dist_dpc.compress.distill import student_from_teacher
from dist_dpc.data import DataConfig, collate
from dist_dpc.tasks import make_task
from dist_dpc.models.heads import pooled_head, cls_hidden, pool
from dist_dpc.privacy.linear_probe import dp_linear_probe
from dist_dpc.privacy.randomness import SecretKey
torch.set_num_threads(1)
mc = ModelConfig(name=f"{sys.argv[1]}/teacher/model")
tok = load_tokenizer(mc, log=None)
teacher = load_sequence_classifier(mc, 2, tok).eval()
student = student_from_teacher(teacher, [0, 2, 4]).eval()
h = torch.load(f"{sys.argv[1]}/distill/head_init.pt", weights_only=False)
student.bert.pooler.dense.weight.data.copy_(h["pooler"]["dense.weight"]); student.bert.pooler.dense.bias.data.copy_(h["pooler"]["dense.bias"])
task = make_task(ModelConfig(name="x"), DataConfig(task="synthetic_sentiment", max_length=32))
data = task.load_data()
tr = task.tokenize(data.train, tok, None, train=True); ev = task.tokenize(data.eval["validation"], tok, None, train=False)
head = pooled_head(student, "x")
def feats(ds):
    out, ys = [], []
    for i in range(0, len(ds), 128):
        b = collate([ds[j] for j in range(i, min(i + 128, len(ds)))], tok.pad_token_id)
        out.append(pool(head, cls_hidden(head, b))); ys.append(b["labels"])
    return torch.cat(out).float(), torch.cat(ys)
xt, yt = feats(tr); xv, yv = feats(ev)
print("train pooled mean abs", float(xt.abs().mean()), "mean vector norm", float(xt.mean(0).norm()))
W0, b0 = teacher.classifier.weight.detach(), teacher.classifier.bias.detach()
def accuracy(w, b): return round(float(((xv @ w.T + b).argmax(1) == yv).float().mean()) * 100, 1)
print("teacher head on student features:", accuracy(W0, b0))
for init in ("teacher", "zero"):
    for opt in ("adam", "sgd"):
        for lr in ((0.05,) if opt == "adam" else (0.05, 1.0)):
            accs = []
            for seed in range(4):
                w, b = (W0, b0) if init == "teacher" else (torch.zeros_like(W0), torch.zeros_like(b0))
                r = dp_linear_probe(xt, yt, weight=w, bias=b, sample_rate=0.256, steps=8, noise_multiplier=0.9668,
                                    max_grad_norm=1.0, lr=lr, key=SecretKey.from_seed(seed), optimizer=opt)
                accs.append(accuracy(r.weight, r.bias))
            print(f"init {init:7} {opt} lr {lr}: {accs}")
r = dp_linear_probe(xt, yt, weight=torch.zeros_like(W0), bias=torch.zeros_like(b0), sample_rate=0.256, steps=8,
                    noise_multiplier=0.0, max_grad_norm=1.0, lr=0.05, key=SecretKey.from_seed(0))
print("no noise, zero init, adam:", accuracy(r.weight, r.bias))
