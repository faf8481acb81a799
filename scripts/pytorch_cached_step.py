#!/usr/bin/env python3
"""The engine benchmark's PyTorch side, f32 and bf16, in one run.

Imports the anchor (../shared/anchors/pytorch_minilm_hydra.py: the same model,
data, Hydra layer, head, AdamW and batch 16 x 64) and times its training step
with the prefix cached, interleaved: plain f32, and under
`torch.autocast("cpu", dtype=torch.bfloat16)` (PyTorch's mixed precision on
CPU: bf16 products through oneDNN, AMX where the CPU has it), which is what
`hydra-edge --matmul-precision bf16` is compared with.

    D=$(bash ../shared/anchors/setup.sh)
    $D/venv/bin/python scripts/pytorch_cached_step.py [anchor.py] [rounds]
"""
import importlib.util
import os
import statistics
import sys
import time

here = os.path.dirname(os.path.abspath(__file__))
anchor_path = sys.argv[1] if len(sys.argv) > 1 else os.path.join(here, "../../shared/anchors/pytorch_minilm_hydra.py")
rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
spec = importlib.util.spec_from_file_location("anchor", anchor_path)
A = importlib.util.module_from_spec(spec)
spec.loader.exec_module(A)
torch, F = A.torch, A.F

tok = A.AutoTokenizer.from_pretrained(A.MODEL_DIR)
base = A.load_bert()
(tr_t, tr_y), _ = A.yelp_split()
ids, am = A.tokenize(tok, tr_t[:A.BATCH])
y = tr_y[:A.BATCH]


def cached_step(bf16):
    model = A.build(base, "hydra", 0)
    opt = A.make_opt(model)
    model.eval()
    with torch.no_grad():
        h_c, mask_c = model.prefix(ids, am)
    model.train()

    def step():
        if bf16:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = model.suffix(h_c, mask_c, am)
            loss = F.cross_entropy(logits.float(), y)
        else:
            loss = F.cross_entropy(model.suffix(h_c, mask_c, am), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    return step


print(f"PyTorch {torch.__version__}, {torch.get_num_threads()} threads, batch {A.BATCH} x {A.SEQ_LEN}, prefix cached")
res = {"f32": [], "bf16": []}
steps = {k: cached_step(k == "bf16") for k in res}
for s in steps.values():
    for _ in range(A.WARMUP):
        s()
for _ in range(rounds):
    for k, s in steps.items():
        ts = []
        for _ in range(A.TIMED // 3):
            t0 = time.perf_counter()
            s()
            ts.append(time.perf_counter() - t0)
        res[k].append(statistics.median(ts) * 1e3)
for k, v in res.items():
    print(f"training step, prefix cached, {k}: median per round " + ", ".join(f"{x:.1f}" for x in v) + " ms")
print(f"f32 / bf16: {statistics.median(res['f32']) / statistics.median(res['bf16']):.2f}")
