"""The four development domains (../shared/data: qqp, mrpc, sick, sts) with their embeddings, one forward
pass per text for both the sentence vector and the token embeddings, cached under .cache/iros.

    domains = load_domains()                 # {"qqp": Domain, ...}; embeds what .cache/ lacks
    d = domains["sick"]; d.vectors[d.ia]     # unit vectors of each pair's `a`
    d.tokens.text(i)                         # text i's token embeddings (float16, [CLS] first)

QQP is read up to QQP_PAIRS lines: enough hard negatives to learn from without outweighing the others.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from iros.bench.pairs import Pair, label_groups
from iros.cache.embedder import PACKAGED_MODEL, load_local_model
from iros.cache.verifier.tokens import MAX_TOKENS
from tools.verifier.data import ROOT, Pairs, TokenStore, cache_dir, read_pairs, unique_texts

# Beside the checkout as the project lays it out; IROS_PAIRS_DIR points elsewhere (a worktree).
DATA = Path(os.environ.get("IROS_PAIRS_DIR") or ROOT.parent / "shared" / "data")
DOMAINS = ("qqp", "mrpc", "sick", "sts")
QQP_PAIRS = 12_000
MAX_LENGTH = 256  # the sentence vector's wordpieces, as sentence-transformers reads all-MiniLM-L6-v2


@dataclass(slots=True)
class Domain:
    name: str
    pairs: Pairs
    texts: list[str]
    vectors: npt.NDArray[np.float32]
    tokens: TokenStore
    ia: npt.NDArray[np.int64]
    ib: npt.NDArray[np.int64]
    y: npt.NDArray[np.bool_]
    groups: npt.NDArray[np.int64]  # per text: its component in the graph of label-1 pairs and same words
    strict_groups: npt.NDArray[np.int64]  # the label-1 pairs alone (label_groups(strict=True))


def read_domain(name: str, data: Path = DATA) -> Pairs:
    pairs = read_pairs(data / name / "dev.jsonl.gz")
    if name == "qqp":
        pairs = Pairs(pairs.a[:QQP_PAIRS], pairs.b[:QQP_PAIRS], pairs.label[:QQP_PAIRS])
    return pairs


def encode(texts: list[str], model: str = PACKAGED_MODEL) -> tuple[npt.NDArray[np.float32], TokenStore]:
    """Unit sentence vectors (mean of the token embeddings, as the embedder pools) and the first
    MAX_TOKENS token embeddings of each text, from one forward pass; cached on disk."""
    digest = hashlib.sha256(f"{model}\0{MAX_LENGTH}\0{MAX_TOKENS}".encode())
    for text in texts:
        digest.update(text.encode())
        digest.update(b"\0")
    path = cache_dir() / f"encoded-{digest.hexdigest()[:16]}.npz"
    if path.exists():
        with np.load(path) as found:
            return found["vectors"], TokenStore(found["flat"], found["offsets"])
    import torch

    st = load_local_model(model, "auto", threads=os.cpu_count() or 1)
    encoder: Any = st[0].auto_model
    tokenizer, encoder = st.tokenizer, encoder.eval()
    order = np.argsort([-len(t) for t in texts], kind="stable")
    vectors = np.empty((len(texts), encoder.config.hidden_size), np.float32)
    parts: list[npt.NDArray[np.float16]] = [np.empty((0, 0), np.float16)] * len(texts)
    with torch.inference_mode():
        for i in range(0, len(texts), 64):
            idx = order[i : i + 64]
            enc = tokenizer(
                [texts[j] for j in idx],
                padding=True,
                truncation=True,
                max_length=MAX_LENGTH,
                return_tensors="pt",
            )
            hidden = encoder(**enc).last_hidden_state.float()
            mask = enc["attention_mask"].unsqueeze(-1).float()
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            pooled = torch.nn.functional.normalize(pooled, dim=1)
            vectors[idx] = pooled.numpy()
            lengths = enc["attention_mask"].sum(dim=1).tolist()
            h = hidden.numpy()
            for row, j in enumerate(idx.tolist()):
                parts[j] = h[row, : min(lengths[row], MAX_TOKENS)].astype(np.float16)
    offsets = np.zeros(len(texts) + 1, np.int64)
    offsets[1:] = np.cumsum([len(p) for p in parts])
    store = TokenStore(np.concatenate(parts), offsets)
    np.savez(path, vectors=vectors, flat=store.flat, offsets=store.offsets)
    return vectors, store


def load_domain(name: str, data: Path = DATA) -> Domain:
    pairs = read_domain(name, data)
    texts, ia, ib = unique_texts(pairs)
    vectors, tokens = encode(texts)
    y = pairs.label.astype(bool)
    # The benchmarks' truth (bench.pairs.label_groups), so the prior is trained and scored as they judge.
    labelled = [
        Pair(a, b, int(label)) for a, b, label in zip(pairs.a, pairs.b, pairs.label.tolist(), strict=True)
    ]

    def per_text(group: dict[str, int]) -> npt.NDArray[np.int64]:
        return np.fromiter((group[t] for t in texts), np.int64, len(texts))

    groups, strict = per_text(label_groups(labelled)), per_text(label_groups(labelled, strict=True))
    return Domain(name, pairs, texts, vectors, tokens, ia, ib, y, groups, strict)


def load_domains(names: tuple[str, ...] = DOMAINS, data: Path = DATA) -> dict[str, Domain]:
    return {name: load_domain(name, data) for name in names}


if __name__ == "__main__":
    import time

    for name in DOMAINS:
        started = time.monotonic()
        d = load_domain(name)
        print(name, len(d.texts), f"{time.monotonic() - started:.0f} s", flush=True)
