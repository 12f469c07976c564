"""The ONNX copy of a local sentence-transformers model, made offline from the files its package ships.

path = onnx_path(model_dir("all-MiniLM-L6-v2"))    # where it lives; None until exported
path = ensure_onnx(model_dir("all-MiniLM-L6-v2"))  # exports it first if missing (a child process, once)

    python -m iros.cache.onnx_export [MODEL]         # what scripts/install runs

The export needs torch, transformers and onnx, which stay install-time tools: it runs in a child process,
so the process that serves never imports them. The file is keyed by a fingerprint of the model's files and
of this exporter, so a changed model or exporter makes a new one. It lives beside the installed packages
(`<venv>/share/iros/models`), or, where that cannot be written, in the user's cache folder.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from iros.cache.base import EmbedderError
from iros.cache.model_files import PACKAGED_MODEL, model_dir

__all__ = ["ensure_onnx", "export", "onnx_path"]

EXPORT_VERSION = "2"  # bump when the exported graph changes
OPSET = 17
FILE = "model.onnx"
EXPORT_TIMEOUT = 600.0


def _roots() -> list[Path]:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return [Path(sys.prefix) / "share" / "iros" / "models", cache / "iros" / "models"]


def fingerprint(source: Path) -> str:
    """The model's configuration files and the weights' size and time, and this exporter's version."""
    digest = hashlib.sha256(f"{EXPORT_VERSION}:{OPSET}".encode())
    for name in ("config.json", "modules.json", "sentence_bert_config.json", "1_Pooling/config.json"):
        path = source / name
        digest.update(path.read_bytes() if path.is_file() else b"-")
    weights = source / "model.safetensors"
    if weights.is_file():
        stat = weights.stat()
        digest.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def _folder(root: Path, source: Path) -> Path:
    return root / f"{source.name if source.name != 'model' else source.parent.name}-{fingerprint(source)}"


def onnx_path(source: Path) -> Path | None:
    """The exported model of the sentence-transformers folder `source`, if there is one."""
    for root in _roots():
        path = _folder(root, source) / FILE
        if path.is_file():
            return path
    return None


def _writable_root() -> Path:
    for root in _roots():
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(root, os.W_OK):
            return root
    raise EmbedderError(
        f"no folder to keep the exported ONNX model in: tried {', '.join(map(str, _roots()))}"
    )


def ensure_onnx(source: Path) -> Path:
    """The exported model, exported first (in a child process, from the packaged files) if missing."""
    found = onnx_path(source)
    if found is not None:
        return found
    cmd = [sys.executable, "-W", "ignore", "-m", "iros.cache.onnx_export", str(source)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=EXPORT_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise EmbedderError(f"exporting {source} to ONNX failed: {exc}") from None
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise EmbedderError(f"exporting {source} to ONNX failed: {last} (run: {' '.join(cmd)})")
    found = onnx_path(source)
    if found is None:
        raise EmbedderError(f"exporting {source} to ONNX left no {FILE}")
    return found


def export(source: Path) -> Path:
    """Export the transformer of a sentence-transformers folder (its token embeddings) to ONNX, with
    the weights in a file beside the graph, and check it against torch. Imports torch: run it apart."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    import numpy as np
    import onnxruntime
    import torch
    from onnxruntime.transformers import optimizer as transformer_optimizer
    from transformers import AutoModel

    # Eager attention traces to plain MatMul/Softmax, which ONNX Runtime fuses into its own Attention.
    model = AutoModel.from_pretrained(str(source), local_files_only=True, attn_implementation="eager").eval()

    class Tokens(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = self.model(
                input_ids=input_ids, attention_mask=attention_mask
            ).last_hidden_state
            return out

    root = _writable_root()
    final = _folder(root, source)
    ids = torch.tensor([[101, 2129, 2079, 1045, 4553, 18750, 1029, 102], [101, 7592, 102, 0, 0, 0, 0, 0]])
    mask = (ids != 0).to(torch.int64)
    with tempfile.TemporaryDirectory(prefix=".export-", dir=root) as tmp:
        single = Path(tmp) / "single.onnx"
        with torch.inference_mode():
            expected = Tokens()(ids, mask).numpy()  # before the export, which leaves the model changed
            torch.onnx.export(
                Tokens(),
                (ids, mask),
                str(single),
                dynamo=False,
                opset_version=OPSET,
                input_names=["input_ids", "attention_mask"],
                output_names=["token_embeddings"],
                dynamic_axes={name: {0: "batch", 1: "tokens"} for name in ("input_ids", "attention_mask")}
                | {"token_embeddings": {0: "batch", 1: "tokens"}},
            )
        staged = Path(tmp) / "out"
        staged.mkdir()
        # ONNX Runtime's own fusions for BERT (attention, embedding and skip layer norms) take away about
        # a hundred small operators per call; the graph stays free of any one CPU's optimisations.
        fused = transformer_optimizer.optimize_model(
            str(single),
            model_type="bert",
            num_heads=model.config.num_attention_heads,
            hidden_size=model.config.hidden_size,
            opt_level=0,
            use_gpu=False,
        )
        # Weights in a file of their own (model.onnx.data): ONNX Runtime maps it rather than copying it,
        # so the rows of the word-piece table that no text uses never take memory.
        fused.save_model_to_file(str(staged / FILE), use_external_data_format=True)
        for path in staged.iterdir():
            path.chmod(0o644)  # onnx writes the weights owner-only; a server may run as another user
        session = onnxruntime.InferenceSession(str(staged / FILE), providers=["CPUExecutionProvider"])
        got = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
        gap = float(np.abs(got - expected)[mask.numpy().astype(bool)].max())
        if gap > 1e-4:
            raise RuntimeError(f"the ONNX model's token embeddings differ from torch's by {gap}")
        if final.exists():
            shutil.rmtree(final)
        staged.rename(final)
    # Earlier exports of the same model (another version of it or of this exporter) are of no more use.
    for old in root.glob(f"{final.name.rpartition('-')[0]}-*"):
        if old != final and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
    return final / FILE


def main(argv: list[str]) -> int:
    source = (
        Path(argv[0]) if argv and Path(argv[0]).is_dir() else model_dir(argv[0] if argv else PACKAGED_MODEL)
    )
    found = onnx_path(source)
    print(found if found is not None else export(source))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
