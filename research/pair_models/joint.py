"""MiniLM's layers above K run jointly over both questions' layer-K states (K=4: DeFormer-style, the
lower layers per question; K=0: a full cross-encoder started from the bi-encoder's weights), with a
classifier over the pooled sides and the cosine. Trained on folds 1-4 (examples at cosine MIN_SIM or
more), scored on fold 0's rows at the cache's similarity threshold.

    python research/pair_models/states.py 0 && python research/pair_models/joint.py 0 2 0.75
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any

import numpy as np
import torch
from common import GATE, OUT, fold0, show
from torch import nn

from iros.cache.embedder import PACKAGED_MODEL, load_local_model

K = int(sys.argv[1]) if len(sys.argv) > 1 else 4
EPOCHS = float(sys.argv[2]) if len(sys.argv) > 2 else 2
MIN_SIM = float(sys.argv[3]) if len(sys.argv) > 3 else 0.75
torch.set_num_threads(2)
torch.manual_seed(0)
started = time.time()
fold = fold0()
with np.load(OUT / f"states{K}.npz") as saved:
    flat = torch.from_numpy(saved["flat"])
    offsets = saved["offsets"]


def batch(q: np.ndarray, c: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Joint sequences [q tokens; c tokens], padded, and the mask of each side."""
    lq, lc = offsets[q + 1] - offsets[q], offsets[c + 1] - offsets[c]
    steps = np.arange(int((lq + lc).max()))
    in_q = steps[None, :] < lq[:, None]
    in_c = (steps[None, :] >= lq[:, None]) & (steps[None, :] < (lq + lc)[:, None])
    rows = np.where(in_q, offsets[q][:, None] + steps[None, :], 0)
    rows = np.where(in_c, offsets[c][:, None] + steps[None, :] - lq[:, None], rows)
    x = flat[torch.from_numpy(rows)].float()
    mq, mc = torch.from_numpy(in_q), torch.from_numpy(in_c)
    x[~(mq | mc)] = 0
    return x, mq, mc


# Where each weight of a layer sits in the pretrained BertLayer.
BERT_NAMES = {
    "q": "attention.self.query",
    "k": "attention.self.key",
    "v": "attention.self.value",
    "o": "attention.output.dense",
    "ln1": "attention.output.LayerNorm",
    "i": "intermediate.dense",
    "out": "output.dense",
    "ln2": "output.LayerNorm",
}


class Layer(nn.Module):
    """A BERT layer with the pretrained weights of `layer`, attending over both questions at once."""

    def __init__(self, layer: Any) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(384, 384) for _ in range(4))
        self.ln1, self.ln2 = nn.LayerNorm(384, eps=1e-12), nn.LayerNorm(384, eps=1e-12)
        self.i, self.out = nn.Linear(384, 1536), nn.Linear(1536, 384)
        weights = layer.state_dict()
        for mine, theirs in BERT_NAMES.items():
            getattr(self, mine).weight.data.copy_(weights[theirs + ".weight"])
            getattr(self, mine).bias.data.copy_(weights[theirs + ".bias"])
        self.drop = nn.Dropout(0.1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, n, 12, 32).transpose(1, 2)

        a = nn.functional.scaled_dot_product_attention(
            heads(self.q(x)),
            heads(self.k(x)),
            heads(self.v(x)),
            attn_mask=mask[:, None, None, :],
            dropout_p=0.1 if self.training else 0.0,
        )
        x = self.ln1(x + self.drop(self.o(a.transpose(1, 2).reshape(b, n, 384))))
        out: torch.Tensor = self.ln2(x + self.drop(self.out(nn.functional.gelu(self.i(x)))))
        return out


class Joint(nn.Module):
    def __init__(self, layers: Any) -> None:
        super().__init__()
        self.seg = nn.Parameter(torch.zeros(2, 384))  # which question a token is from
        self.layers = nn.ModuleList(Layer(layer) for layer in layers)
        self.head1 = nn.Linear(4 * 384 + 1, 256)
        self.head2 = nn.Linear(256, 1)

    def forward(self, x: torch.Tensor, mq: torch.Tensor, mc: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
        x = x + mq[..., None] * self.seg[0] + mc[..., None] * self.seg[1]
        for layer in self.layers:
            x = layer(x, mq | mc)
        fq, fc = mq[..., None].float(), mc[..., None].float()
        u, v = (x * fq).sum(1) / fq.sum(1), (x * fc).sum(1) / fc.sum(1)
        h = torch.cat([u + v, (u - v).abs(), u * v, x[:, 0], cos[:, None]], -1)
        out: torch.Tensor = self.head2(nn.functional.gelu(self.head1(h))).squeeze(1)
        return out


model = Joint(load_local_model(PACKAGED_MODEL, "cpu", threads=2)[0].auto_model.encoder.layer[K:])
live = fold.s >= MIN_SIM
Q, C, Y, S = fold.q[live], fold.c[live], fold.y[live], fold.s[live]
print("examples", len(Y), int(Y.sum()), flush=True)
val = fold.val


def score(bs: int = 256) -> np.ndarray:
    model.eval()
    out = np.full(len(val.query), -np.inf)
    rows = np.flatnonzero(val.similarity >= GATE)  # the others are never served
    with torch.inference_mode():
        for i in range(0, len(rows), bs):
            r = rows[i : i + bs]
            x, mq, mc = batch(val.query[r], val.candidate[r])
            out[r] = model(x, mq, mc, torch.from_numpy(val.similarity[r].astype(np.float32))).numpy()
    return out


head = [p for n, p in model.named_parameters() if n.startswith("head") or n == "seg"]
body = [p for n, p in model.named_parameters() if n.startswith("layers")]
opt = torch.optim.AdamW([{"params": body, "lr": 5e-5}, {"params": head, "lr": 1e-3}], weight_decay=0.01)
BS = 32
steps = int(EPOCHS * math.ceil(len(Y) / BS))
sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[5e-5, 1e-3], total_steps=steps, pct_start=0.1)
loss_fn = nn.BCEWithLogitsLoss()
step = 0
while step < steps:
    model.train()
    perm = fold.rng.permutation(len(Y))
    total = seen = 0.0
    for i in range(0, len(Y), BS):
        if step >= steps:
            break
        b = perm[i : i + BS]
        swap = fold.rng.random(len(b)) < 0.5  # either question may come first
        x, mq, mc = batch(np.where(swap, C[b], Q[b]), np.where(swap, Q[b], C[b]))
        loss = loss_fn(model(x, mq, mc, torch.from_numpy(S[b])), torch.from_numpy(Y[b]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        step += 1
        total += loss.item() * len(b)
        seen += len(b)
        if step % 200 == 0:
            print("step", step, "/", steps, round(total / seen, 4), round(time.time() - started), flush=True)
    logit = score()
    show(f"joint K={K} step {step}", val, logit)
np.save(OUT / f"joint_val_{K}.npy", logit)
