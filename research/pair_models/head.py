"""A small cross-attention head (decomposable attention) over frozen last-layer MiniLM token embeddings,
as the cache keeps them per entry ([CLS]/[SEP] dropped, unit rows): trained on folds 1-4, scored on fold 0.

    python research/pair_models/head.py 128 4      # width, epochs
"""

from __future__ import annotations

import sys
import time

import numpy as np
import torch
from common import OUT, fold0, show
from torch import nn

from tools.verifier.data import TokenStore, cache_dir

D = int(sys.argv[1]) if len(sys.argv) > 1 else 128
EPOCHS = int(sys.argv[2]) if len(sys.argv) > 2 else 4
torch.set_num_threads(2)
torch.manual_seed(0)
started = time.time()
fold = fold0()
store = TokenStore.build(fold.data.texts, cache_dir())
lengths = np.diff(store.offsets)
keep = np.ones(len(store.flat), bool)
keep[store.offsets[:-1]] = False
keep[store.offsets[1:] - 1] = False
unit = store.flat[keep].astype(np.float32)
unit /= np.maximum(np.linalg.norm(unit, axis=1, keepdims=True), 1e-6)
flat = torch.from_numpy(unit.astype(np.float16))
offsets = np.zeros(len(lengths) + 1, np.int64)
offsets[1:] = np.cumsum(np.maximum(lengths - 2, 0))


def padded(idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    start = offsets[idx]
    n = np.maximum(offsets[idx + 1] - start, 1)
    steps = np.arange(int(n.max()))
    mask = steps[None, :] < n[:, None]
    x = flat[torch.from_numpy(np.where(mask, start[:, None] + steps[None, :], 0))].float()
    m = torch.from_numpy(mask)
    x[~m] = 0
    return x, m


class Head(nn.Module):
    def __init__(self, d: int = D) -> None:
        super().__init__()
        self.proj = nn.Linear(384, d)
        self.compare = nn.Linear(4 * d, d)
        self.out1 = nn.Linear(6 * d + 2, d)
        self.out2 = nn.Linear(d, 1)

    def side(self, h: torch.Tensor, aligned: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = nn.functional.gelu(self.compare(torch.cat([h, aligned, h - aligned, h * aligned], -1)))
        mf = mask.unsqueeze(-1).float()
        mean = (m * mf).sum(1) / mf.sum(1).clamp(min=1)
        top = m.masked_fill(~mask.unsqueeze(-1), -1e4).max(1).values
        return torch.cat([mean, top], -1)

    def forward(
        self, xq: torch.Tensor, mq: torch.Tensor, xc: torch.Tensor, mc: torch.Tensor, cos: torch.Tensor
    ) -> torch.Tensor:
        hq, hc = nn.functional.gelu(self.proj(xq)), nn.functional.gelu(self.proj(xc))
        e = hq @ hc.transpose(1, 2) / hq.shape[-1] ** 0.5
        e = e.masked_fill(~(mq.unsqueeze(2) & mc.unsqueeze(1)), -1e4)
        vq = self.side(hq, torch.softmax(e, 2) @ hc, mq)
        vc = self.side(hc, torch.softmax(e, 1).transpose(1, 2) @ hq, mc)
        z = torch.cat([vq + vc, (vq - vc).abs(), vq * vc, cos.unsqueeze(1), cos.unsqueeze(1) ** 2], -1)
        out: torch.Tensor = self.out2(nn.functional.gelu(self.out1(z))).squeeze(1)
        return out


def score(model: Head, q: np.ndarray, c: np.ndarray, s: np.ndarray, bs: int = 1024) -> np.ndarray:
    model.eval()
    out = []
    with torch.inference_mode():
        for i in range(0, len(q), bs):
            xq, mq = padded(q[i : i + bs])
            xc, mc = padded(c[i : i + bs])
            out.append(model(xq, mq, xc, mc, torch.from_numpy(s[i : i + bs].astype(np.float32))))
    return torch.cat(out).numpy().astype(np.float64)


print("examples", len(fold.y), int(fold.y.sum()), flush=True)
model = Head()
opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=EPOCHS * (len(fold.y) // 256 + 1))
loss_fn = nn.BCEWithLogitsLoss()
val = fold.val
for epoch in range(EPOCHS):
    model.train()
    perm = fold.rng.permutation(len(fold.y))
    total = 0.0
    for i in range(0, len(fold.y), 256):
        b = perm[i : i + 256]
        xq, mq = padded(fold.q[b])
        xc, mc = padded(fold.c[b])
        loss = loss_fn(model(xq, mq, xc, mc, torch.from_numpy(fold.s[b])), torch.from_numpy(fold.y[b]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        total += loss.item() * len(b)
    print("epoch", epoch, round(total / len(fold.y), 4), round(time.time() - started), flush=True)
    logit = score(model, val.query, val.candidate, val.similarity)
    show(f"head epoch {epoch}", val, logit)
OUT.mkdir(parents=True, exist_ok=True)
np.save(OUT / f"head_val_{D}.npy", logit)
