"""Layer-K token states of every QQP text (MiniLM, tokenized as the embedder does), as one ragged
float16 array. K=0: the embedding layer's output; K=4: after four of the six layers.

    python research/pair_models/states.py 4
"""

from __future__ import annotations

import sys
import time

import numpy as np
import torch
from common import OUT, texts

from iros.cache.embedder import PACKAGED_MODEL, load_local_model
from iros.cache.verifier.tokens import MAX_TOKENS

K = int(sys.argv[1])
torch.set_num_threads(2)
all_texts = texts()
st = load_local_model(PACKAGED_MODEL, "cpu", threads=2)
bert = st[0].auto_model.eval()
order = np.argsort([-len(t) for t in all_texts], kind="stable")
parts: list[np.ndarray] = [np.empty(0)] * len(all_texts)
started = time.time()
with torch.inference_mode():
    for i in range(0, len(all_texts), 128):
        idx = order[i : i + 128]
        enc = st.tokenizer(
            [all_texts[j] for j in idx],
            padding=True,
            truncation=True,
            max_length=MAX_TOKENS,
            return_tensors="pt",
        )
        hidden = bert(**enc, output_hidden_states=True).hidden_states[K].float().numpy()
        for row, (j, n) in enumerate(zip(idx.tolist(), enc["attention_mask"].sum(1).tolist(), strict=True)):
            parts[j] = hidden[row, :n].astype(np.float16)
        if i % 12800 == 0:
            print(i, round(time.time() - started), flush=True)
offsets = np.zeros(len(all_texts) + 1, np.int64)
offsets[1:] = np.cumsum([len(p) for p in parts])
OUT.mkdir(parents=True, exist_ok=True)
np.savez(OUT / f"states{K}.npz", flat=np.concatenate(parts), offsets=offsets)
print("done", round(time.time() - started))
