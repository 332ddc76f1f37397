"""Command line: ``python -m cqil_kernels analyze|search|eval|generate|calibrate|distill|main|tune|bench``.

Every command works offline on the embedded SmolLM2-135M by default (``--model`` takes a local HF
directory or a .gguf file instead). Errors the user can fix (missing or unreadable file, bad plan,
unknown model or device, an output path that cannot be written) print one line naming the
problem and exit with status 2. Arguments, text files, plan files and output paths are checked
before the model loads, so a typo costs milliseconds, not the loading and the work before it.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from contextlib import contextmanager, redirect_stdout
from pathlib import Path

__all__ = ["main", "build_parser", "generate_text", "add_distill_arguments", "run_distill_from_args"]

EXIT_USAGE = 2
DEFAULT_PROMPT = "Explain in two sentences why the sky is blue."
BACKENDS = ("auto", "torch", "triton")

#: ``--rank-metric`` values and what they rank by (for the search table's headline)
RANK_METRICS = {"kl": "KL(base || converted)", "ppl": "perplexity increase"}


class CLIError(Exception):
    """A problem with the user's input; printed without a traceback, exit status 2."""


class _ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad argument in one line (exit status 2), like every other CLI error."""

    def error(self, message):  # noqa: D401 - argparse's hook
        self.exit(EXIT_USAGE, f"error: {message} (see {self.prog} --help)\n")


# ------------------------------------------------------------------------------------ argument types
def _int_at_least(minimum: int, what: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
        return value

    parse.__name__ = what  # argparse names the type in its messages
    return parse


_positive_int = _int_at_least(1, "a positive integer")
_nonneg_int = _int_at_least(0, "an integer >= 0")


def _float_at_least(minimum: float, strict: bool, what: str):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not math.isfinite(value) or value < minimum or (strict and value == minimum):
            raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
        return value

    parse.__name__ = what
    return parse


_positive_float = _float_at_least(0.0, True, "a number > 0")
_nonneg_float = _float_at_least(0.0, False, "a number >= 0")


def _layer_list(text: str) -> list[int]:
    """``"0,1,-1"`` -> [0, 1, -1] (negative: counted from the last layer)."""
    try:
        return [int(v) for v in text.replace(" ", "").split(",") if v != ""]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer indices, got {text!r}") from None


def _prompt(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("the prompt is empty")
    return text


def _model_args(g) -> None:
    g.add_argument("--model", default=None, help="'smollm2' (default: embedded SmolLM2-135M-Instruct GGUF), "
                   "a local HuggingFace directory, or a .gguf file; never downloaded")
    g.add_argument("--dtype", default="float32", help="float32 (default), bfloat16 or float16")
    g.add_argument("--device", default="cpu", help="torch device (default cpu)")
    g.add_argument("--backend", default="auto", choices=BACKENDS, help="CQIL backend for converted groups (default auto)")


def _common(parser: argparse.ArgumentParser, seq_len: int = 1024, max_windows: int | None = None) -> None:
    g = parser.add_argument_group("model and text")
    _model_args(g)
    g.add_argument("--seq-len", type=_int_at_least(2, "an integer >= 2"), default=seq_len,
                   help=f"tokens per window (default {seq_len})")
    g.add_argument("--stride", type=_positive_int, default=None,
                   help="tokens between window starts (default: seq-len, non-overlapping)")
    g.add_argument("--max-windows", type=_positive_int, default=max_windows,
                   help=f"windows of text to use (default {max_windows or 'all'})")
    g.add_argument("--batch-size", type=_positive_int, default=2, help="windows per forward (default 2)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars (model loading included)")
    g.add_argument("--traceback", action="store_true", help="show the full traceback of errors")


def _search_args(parser: argparse.ArgumentParser, groups_default: int | None, beam: int = 4,
                 contiguous_top: int = 4) -> None:
    g = parser.add_argument_group("plan search")
    g.add_argument("--parallel", type=_int_at_least(2, "an integer >= 2"), default=2,
                   help="layers per group P (default 2)")
    g.add_argument("--groups", type=_positive_int, default=groups_default,
                   help=f"number of groups N (default {groups_default or 'as many as the budget allows'})")
    g.add_argument("--budget", type=_nonneg_float, default=None,
                   help="quality budget of the whole plan on calibration text: relative perplexity "
                   "increase (0.1 = +10%%) or mean KL in nats, see --budget-metric")
    g.add_argument("--budget-metric", choices=["ppl", "kl"], default="ppl", help="what --budget limits (default ppl)")
    g.add_argument("--rank-metric", choices=list(RANK_METRICS), default="kl",
                   help="cost that ranks candidates (default kl: KL(base||converted))")
    g.add_argument("--exclude", type=_layer_list, default=[], help="layers no group may touch, e.g. 0,1,-1")
    g.add_argument("--bypass", type=_nonneg_int, default=0, help="bypass distance d (default 0: plain CQIL)")
    g.add_argument("--seed", type=int, default=0, help="tie-break seed (default 0)")
    g.add_argument("--beam", type=_positive_int, default=beam, help="candidates measured jointly per step (default %(default)s)")
    g.add_argument("--swap-rounds", type=_nonneg_int, default=0, help="rounds of trying to swap chosen groups (default 0)")
    g.add_argument("--contiguous-top", type=_int_at_least(-1, "an integer >= -1"), default=contiguous_top,
                   help="contiguous windows measured for comparison (default %(default)s; -1: all)")
    g.add_argument("--corrected", action="store_true",
                   help="rank candidates by their cost after the training-free correction (calibrate): "
                   "every measured plan is calibrated first (slower)")


def _calibrate_args(parser: argparse.ArgumentParser) -> None:
    """The options of the training-free correction (``cqil_kernels.calibrate``)."""
    from .calibrate import FOLDS, MAPS, TARGETS

    g = parser.add_argument_group("training-free correction (calibrate)")
    g.add_argument("--map", choices=MAPS, default="full",
                   help="the correction per group: full H x H (default), lowrank, or diagonal (per channel)")
    g.add_argument("--rank", type=_positive_int, default=64, help="rank of --map lowrank (default 64)")
    g.add_argument("--target", choices=TARGETS, default="normalized",
                   help="fit errors as the next layer's norm sees them (normalized, default) or on the residual stream")
    g.add_argument("--fold", choices=FOLDS, default="both",
                   help="fold into o_proj and down_proj (both, default) or down_proj only (mlp: exact, weaker)")
    g.add_argument("--bypass-choice", choices=["search", "plan"], default="search",
                   help="search: try d = 0..P-1 per group and keep the best after correction (default); "
                   "plan: the plan's own bypass")
    g.add_argument("--ridge", type=_nonneg_float, default=None,
                   help="ridge strength relative to the mean diagonal (default: chosen on held-back windows)")
    g.add_argument("--refit", type=_nonneg_int, default=0, help="extra fits per group with the map folded in (default 0)")
    g.add_argument("--holdout", type=float, default=0.25,
                   help="fraction of the windows held back to choose the ridge and d (default 0.25)")


def _calibrate_kwargs(args) -> dict:
    if args.ridge is not None and args.ridge <= 0:
        raise CLIError(f"--ridge must be > 0, got {args.ridge}")
    if not 0 <= args.holdout < 1:
        raise CLIError(f"--holdout must be in [0, 1), got {args.holdout}")
    return dict(map=args.map, rank=args.rank, target=args.target, fold=args.fold, bypass=args.bypass_choice,
                ridge=args.ridge, refit=args.refit, holdout=args.holdout)


def add_distill_arguments(parser, default_steps: int = 0, *, optional: bool = True, lr: float = 5e-4,
                          target: str = "grouped", batch_size: int = 4, seq_len: int = 256, windows: int = 64,
                          rank: int = 16, checkpointing: bool = False):
    """Add the ``--distill-*`` options to an argparse parser (group "distillation").

    ``optional``: ``--distill-steps 0`` turns distillation off (else steps must be >= 1). The
    other keywords are the defaults the options get, and that their help shows.
    """
    g = parser.add_argument_group("distillation (LoRA + KL to the unconverted model)")
    g.add_argument("--distill-steps", type=_nonneg_int if optional else _positive_int, default=default_steps,
                   help="optimizer steps (default %(default)s" + ("; 0: no distillation)" if optional else ")"))
    g.add_argument("--distill-lr", type=_positive_float, default=lr, help="AdamW learning rate (default %(default)s)")
    g.add_argument("--distill-rank", type=_positive_int, default=rank, help="LoRA rank (default %(default)s)")
    g.add_argument("--distill-alpha", type=_positive_float, default=None, help="LoRA alpha (default 2 * rank)")
    g.add_argument("--distill-target", choices=["grouped", "all"], default=target,
                   help="layers that get adapters (default %(default)s)")
    g.add_argument("--distill-batch-size", type=_positive_int, default=batch_size,
                   help="windows per step (default %(default)s)")
    g.add_argument("--distill-seq-len", type=_int_at_least(2, "an integer >= 2"), default=seq_len,
                   help="tokens per window (default %(default)s)")
    g.add_argument("--distill-windows", type=_positive_int, default=windows,
                   help="distillation windows (default %(default)s)")
    g.add_argument("--distill-text", default=None,
                   help="distillation text (default: the calibration text, else built-in calibration half)")
    g.add_argument("--distill-temperature", type=_positive_float, default=1.0, help="KL temperature (default 1)")
    g.add_argument("--distill-max-seconds", type=_nonneg_float, default=0.0,
                   help="optional training time budget in seconds: fewer steps when the machine is slower, so "
                   "the result depends on its speed (default 0: none, exactly --distill-steps)")
    g.add_argument("--distill-checkpointing", action=argparse.BooleanOptionalAction, default=checkpointing,
                   help="activation checkpointing of the decoder layers: about one layer's activations in "
                   "memory instead of all, for about one more forward per step (default %(default)s)")
    g.add_argument("--distill-seed", type=int, default=0, help="LoRA init / window order seed (default 0)")
    g.add_argument("--distill-out", default=None, help="write the DistillResult JSON here")
    return parser


#: the main job's distillation (measured on SmolLM2, see README "What it costs in quality"):
#: 2 windows per step with activation checkpointing keep the job under its 3 GB memory budget
#: (3-step probes of the distill command: batch 4 4.3 GB, batch 4 checkpointed 2.7 GB, batch 2
#: checkpointed 2.1 GB; the main job's distill stage peaked at 3.1 GB with batch 4 checkpointed)
MAIN_DISTILL = dict(default_steps=32, lr=1e-3, target="all", batch_size=2, seq_len=256, windows=48, checkpointing=True)
#: the main job's search and evaluation: sized with the distillation and the calibration to fit the
#: 15-minute budget on 2 CPU cores (README "Two commands")
MAIN_SEARCH = dict(beam=2, contiguous_top=2)
MAIN_WINDOWS = dict(calib=4, eval=12, calibrate=16)


#: the commands that run under ``torchrun --nproc-per-node=W`` (each rank computes its share of every group)
TORCHRUN_COMMANDS = ("generate", "eval", "bench")


def _torchrun_args(parser: argparse.ArgumentParser) -> None:
    from .distributed.launch import DEFAULT_TIMEOUT_S

    g = parser.add_argument_group("several processes (torchrun --nproc-per-node=W -m cqil_kernels ...)")
    g.add_argument("--dist-timeout", type=_positive_float, default=DEFAULT_TIMEOUT_S,
                   help="seconds a rank waits for the others in any collective before the run fails "
                   "(default %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    parser = _ArgumentParser(
        prog="python -m cqil_kernels",
        description="CQIL plan analysis, search, evaluation and generation (offline, CPU friendly).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("analyze", help="layer-input similarity and cost of every candidate group",
                       description="Measure cosine similarity of layer inputs and the cost of converting "
                       "each group of --parallel adjacent layers alone. Writes JSON and a PNG.")
    _common(p, max_windows=4)
    p.add_argument("--text", "--calib-text", dest="text", default=None,
                   help="calibration text file (UTF-8; default: built-in text, calibration half)")
    p.add_argument("--parallel", type=_int_at_least(2, "an integer >= 2"), default=2, help="layers per group (default 2)")
    p.add_argument("--bypass", type=_nonneg_int, default=0, help="bypass distance d (default 0)")
    p.add_argument("--exclude", type=_layer_list, default=[], help="layers not to measure, e.g. 0,-1")
    p.add_argument("--no-costs", action="store_true", help="similarity only (one forward per window)")
    p.add_argument("--out", default="reports/analysis.json", help="JSON output (default reports/analysis.json)")
    p.add_argument("--plot", default=None, help="PNG output (default: --out with .png)")
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("search", help="choose a plan by measured cost",
                       description="Choose disjoint groups by measured cost on calibration text and "
                       "write the plan as {\"groups\": [[...], ...], \"bypass\": d}.")
    _common(p, max_windows=4)
    p.add_argument("--text", "--calib-text", dest="text", default=None,
                   help="calibration text file (default: built-in text, calibration half)")
    _search_args(p, groups_default=None)
    p.add_argument("--analysis", default=None, help="reuse an analysis JSON written by 'analyze'")
    p.add_argument("--out", default="plan.json", help="plan JSON output (default plan.json)")
    p.add_argument("--report", default=None, help="also write the full search report (JSON) here")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("eval", help="perplexity, KL and top-1 agreement of a plan",
                       description="Evaluate the model converted to --plan against its sequential self.")
    _common(p, max_windows=8)
    p.add_argument("--plan", default=None, help="plan JSON (default: none, the sequential model)")
    p.add_argument("--text", "--eval-text", dest="text", default=None,
                   help="evaluation text file (default: built-in text, evaluation half)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    _torchrun_args(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("generate", help="greedy generation with a plan",
                       description="Greedy generation from a prompt (chat template when the tokenizer "
                       "has one), with the converted and, unless --no-base, the sequential model.")
    _common(p)
    p.add_argument("--plan", default=None, help="plan JSON (default: none, the sequential model)")
    p.add_argument("--prompt", type=_prompt, default=DEFAULT_PROMPT, help="the prompt (not empty)")
    p.add_argument("--max-new-tokens", type=_positive_int, default=48, help="tokens to generate (default 48)")
    p.add_argument("--no-chat-template", action="store_true", help="use the prompt as raw text")
    p.add_argument("--no-base", action="store_true", help="do not also generate with the sequential model")
    p.add_argument("--out", default=None, help="write prompt, outputs and tokens/s as JSON here")
    _torchrun_args(p)
    p.set_defaults(func=cmd_generate)

    _add_calibrate_command(sub)

    p = sub.add_parser("main", help="the whole job: analyze, search, convert, evaluate, generate, report",
                       description="End to end on the model: analyze and search on calibration text, "
                       "convert, evaluate on different text, generate a sample, recover quality by "
                       "distillation, print a table and write JSON + PNG reports into --out.")
    _common(p, seq_len=512, max_windows=None)
    p.add_argument("--calib-text", default=None, help="calibration text (default: built-in, calibration half)")
    p.add_argument("--eval-text", default=None, help="evaluation text (default: built-in, evaluation half)")
    p.add_argument("--calib-windows", type=_positive_int, default=MAIN_WINDOWS["calib"],
                   help="calibration windows (default %(default)s)")
    p.add_argument("--eval-windows", type=_positive_int, default=MAIN_WINDOWS["eval"],
                   help="evaluation windows (default %(default)s)")
    _search_args(p, groups_default=4, **MAIN_SEARCH)
    p.add_argument("--prompt", type=_prompt, default=DEFAULT_PROMPT, help="prompt for the generated sample")
    p.add_argument("--max-new-tokens", type=_positive_int, default=32, help="tokens to generate (default 32)")
    p.add_argument("--out", default="reports", help="report folder (default reports/)")
    p.add_argument("--calibrate-windows", type=_nonneg_int, default=MAIN_WINDOWS["calibrate"],
                   help="windows of the calibration text (seq-len tokens each) for the training-free correction "
                   "of the searched plan (default %(default)s; 0: no correction)")
    _calibrate_args(p)
    # On by default, a fixed number of steps (deterministic), on top of the correction; --distill-steps 0 skips it.
    add_distill_arguments(p, **MAIN_DISTILL)
    add_main_tune_arguments(p)
    p.set_defaults(func=cmd_main)

    p = sub.add_parser("distill", help="recover quality: LoRA + KL distillation of a converted plan",
                       description="Convert to --plan, train LoRA adapters on calibration text to match "
                       "the unconverted model (KL), merge them, evaluate on --eval-text before and after, "
                       "and save the converted model to --out (reload with cqil_kernels.from_pretrained).")
    _common(p, seq_len=1024, max_windows=4)
    p.add_argument("--plan", required=True, help="plan JSON")
    p.add_argument("--text", "--calib-text", dest="text", default=None,
                   help="distillation text (default: built-in text, calibration half)")
    p.add_argument("--eval-text", default=None, help="evaluation text (default: built-in text, evaluation half)")
    p.add_argument("--out", default=None, help="save the distilled converted model here (save_pretrained)")
    add_distill_arguments(p, default_steps=200, optional=False)
    p.set_defaults(func=cmd_distill)

    _add_tune_parser(sub)
    _add_bench_parser(sub)
    return parser


# ------------------------------------------------------------------------------------ checks before loading
def _check_out_dir(path, what: str) -> None:
    """``path`` is, or can be created as, a writable folder (nothing is created here)."""
    p = Path(os.fspath(path)).expanduser().absolute()
    if p.exists():
        if not p.is_dir():
            raise CLIError(f"{what} {path} exists and is not a folder")
        if not os.access(p, os.W_OK | os.X_OK):
            raise CLIError(f"{what} {path} is not writable")
        return
    ancestor = p.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise CLIError(f"{what} {path} cannot be created: {ancestor} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise CLIError(f"{what} {path} cannot be created: {ancestor} is not writable")


def _check_out_file(path, what: str) -> None:
    """``path`` can be written as a file: not a folder, and its folder exists or can be created."""
    if path is None:
        return
    p = Path(os.fspath(path)).expanduser()
    if p.is_dir():
        raise CLIError(f"{what} {path} is a folder; give a file name")
    if p.exists() and not os.access(p, os.W_OK):
        raise CLIError(f"{what} {path} is not writable")
    _check_out_dir(p.parent, f"folder of {what}")


def _check_text_file(path, what: str) -> None:
    from .texts import read_text

    if path is None:
        return
    if Path(path).is_dir():
        raise CLIError(f"{what} {path} is a folder, not a text file")
    read_text(path)  # FileNotFoundError / ValueError (not UTF-8, empty) name the problem


def _read_plan_file(path):
    """A plan JSON file -> CQILPlan (structure checked; the layer range once the model is known)."""
    import json

    from .plan import CQILPlan

    if path is None:
        return None
    p = Path(path)
    if not p.exists():
        raise CLIError(f"plan file not found: {path}")
    if not p.is_file():
        raise CLIError(f"plan path {path} is a folder, not a plan JSON file")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise CLIError(f"plan file {path} is not UTF-8 text: {e}") from None
    except json.JSONDecodeError as e:
        raise CLIError(f"plan file {path} is not valid JSON: {e}") from None
    try:
        return CQILPlan.from_dict(data)
    except (ValueError, TypeError) as e:
        raise CLIError(f"bad plan {path}: {e}") from None


def _check_plan_fits(plan, path, num_layers: int) -> None:
    if plan is None:
        return
    try:
        plan.validate_for(num_layers)
    except ValueError as e:
        raise CLIError(f"bad plan {path}: {e}") from None


def _check_model_args(args) -> None:
    """Device, dtype and the model spec: checked in milliseconds, before anything loads."""
    from .loading import check_model_spec, parse_device, parse_dtype

    parse_device(args.device)
    parse_dtype(args.dtype)
    check_model_spec(args.model)


def _add_calibrate_command(sub) -> None:
    p = sub.add_parser("calibrate", help="training-free correction of a plan, folded into the weights",
                       description="Fit a linear correction per group of --plan on calibration text (closed form, "
                       "ridge toward the identity), fold it into each group's o_proj/down_proj, choose the bypass "
                       "per group by measurement, and save the corrected converted model to --out (plain weights, "
                       "the plan in config.json: reload with cqil_kernels.from_pretrained).")
    _common(p, seq_len=512, max_windows=16)
    p.add_argument("--plan", required=True, help="plan JSON")
    p.add_argument("--text", "--calib-text", dest="text", default=None,
                   help="calibration text (default: built-in text, calibration half)")
    p.add_argument("--eval-text", default=None,
                   help="also measure the plan before and after on this held-out text (never the calibration text)")
    p.add_argument("--eval-windows", type=_positive_int, default=8, help="held-out windows (default 8)")
    p.add_argument("--out", default=None, help="save the calibrated model and tokenizer here (save_pretrained)")
    p.add_argument("--report", default=None, help="write the calibration result (JSON) here")
    _calibrate_args(p)
    p.set_defaults(func=cmd_calibrate)


# ------------------------------------------------------------------------------------ helpers
def _progress(args) -> bool:
    return not args.no_progress


def _load(args):
    from .loading import load_model

    t0 = time.perf_counter()
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device, progress=_progress(args))
    _log(f"loaded {args.model or 'smollm2 (embedded)'}: {model.config.num_hidden_layers} layers "
         f"in {time.perf_counter() - t0:.1f} s")
    return model, tokenizer


def _windows(args, tokenizer, path, split, max_windows, seq_len=None):
    from .texts import load_windows

    windows = load_windows(tokenizer, path, split=split, seq_len=seq_len or args.seq_len, stride=args.stride,
                           max_windows=max_windows)
    _log(f"text {windows.source}: {len(windows)} windows x {windows.seq_len} tokens, {windows.num_scored} scored")
    return windows


def _resolve_layers(layers: list[int], num_layers: int) -> list[int]:
    from .analysis import resolve_layers

    try:
        return resolve_layers(layers, num_layers, "--exclude")
    except (ValueError, TypeError) as e:
        raise CLIError(str(e)) from None


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _num_layers(model) -> int:
    from .conversion import decoder_layers

    return len(decoder_layers(model))


def generate_text(model, tokenizer, prompt: str, max_new_tokens: int = 48, chat_template: bool = True) -> dict:
    """Greedy continuation of ``prompt``; returns text, token counts, seconds and tokens/s.

    With ``chat_template`` and a tokenizer that has one, the prompt is a user message.

    Raises:
        ValueError: an empty prompt, or ``max_new_tokens`` not a positive int.
    """
    import torch

    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"prompt must be a non-empty string, got {prompt!r}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if chat_template and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    else:
        text = prompt
    enc = tokenizer(text, return_tensors="pt", add_special_tokens=not chat_template)
    if enc["input_ids"].shape[1] == 0:
        raise ValueError(f"prompt {prompt!r} tokenizes to no tokens")
    device = next(model.parameters()).device
    ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=pad, temperature=None, top_p=None, top_k=None)
        seconds = time.perf_counter() - t0
    new = out[0, ids.shape[1]:]
    return {
        "prompt": prompt,
        "text": tokenizer.decode(new, skip_special_tokens=True),
        "prompt_tokens": int(ids.shape[1]),
        "new_tokens": int(new.numel()),
        "token_ids": new.tolist(),
        "seconds": seconds,
        "tokens_per_second": new.numel() / seconds if seconds > 0 else 0.0,
    }


def _distill_text(args):
    """The text distillation reads: --distill-text, else the calibration text, else the built-in half."""
    return args.distill_text or getattr(args, "calib_text", None) or getattr(args, "text", None)


def run_distill_from_args(args, model, tokenizer, plan=None, eval_windows=None):
    """Distill ``model`` as the ``--distill-*`` options say; returns the DistillResult.

    ``model`` is converted in place to ``plan`` when it is not converted yet. Writes
    ``--distill-out`` when given.
    """
    from .conversion import convert, get_plan
    from .distill import distill
    from .texts import load_windows

    if get_plan(model) is None:
        if plan is None:
            raise ValueError("model is not converted and no plan was given")
        convert(model, plan, backend=getattr(args, "backend", "auto"))
    windows = load_windows(tokenizer, _distill_text(args), split="calib", seq_len=args.distill_seq_len,
                           max_windows=args.distill_windows)
    res = distill(
        model, windows, rank=args.distill_rank, alpha=args.distill_alpha, target=args.distill_target,
        steps=args.distill_steps, lr=args.distill_lr, batch_size=args.distill_batch_size,
        temperature=args.distill_temperature, seed=args.distill_seed,
        max_seconds=args.distill_max_seconds or None, eval_windows=eval_windows,
        checkpointing=args.distill_checkpointing,
        eval_batch_size=getattr(args, "batch_size", 2), progress=_progress(args),
    )
    res.settings["text"] = windows.to_dict()
    if args.distill_out:
        res.to_json(args.distill_out)
    return res


# ------------------------------------------------------------------------------------ commands
def cmd_analyze(args) -> int:
    from .analysis import analyze

    _check_model_args(args)
    _check_text_file(args.text, "calibration text")
    _check_out_file(args.out, "--out")
    png = Path(args.plot) if args.plot else Path(args.out).with_suffix(".png")
    _check_out_file(png, "--plot")
    model, tok = _load(args)
    exclude = _resolve_layers(args.exclude, _num_layers(model))
    windows = _windows(args, tok, args.text, "calib", args.max_windows)
    result = analyze(model, windows, args.parallel, bypass=args.bypass, exclude=exclude,
                     measure_costs=not args.no_costs, batch_size=args.batch_size, progress=_progress(args),
                     backend=args.backend)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result.to_json(out)
    result.plot(png)
    from .report import format_table

    rows = [[f"{'-'.join(map(str, c.group))}", c.kl, c.ppl_increase * 100, c.top1_agreement,
             result.similarity[c.group[0]][c.group[-1]]] for c in result.ranked("kl")]
    print(format_table(["group", "KL", "ppl %", "top-1", "cos(in)"], rows))
    print(f"base perplexity {result.base_perplexity:.3f}; wrote {out} and {png}")
    return 0


def _search_kwargs(args) -> dict:
    return dict(budget_metric=args.budget_metric, rank_metric=args.rank_metric, bypass=args.bypass, seed=args.seed,
                beam=args.beam, swap_rounds=args.swap_rounds,
                contiguous_top=None if args.contiguous_top < 0 else args.contiguous_top,
                batch_size=args.batch_size, progress=_progress(args), backend=args.backend,
                corrected=getattr(args, "corrected", False))


def cmd_search(args) -> int:
    from .analysis import LayerAnalysis
    from .search import search

    if args.groups is None and args.budget is None:
        raise CLIError("give --groups N, --budget B, or both")
    _check_model_args(args)
    _check_text_file(args.text, "calibration text")
    _check_out_file(args.out, "--out")
    _check_out_file(args.report, "--report")
    analysis = None
    if args.analysis:
        if not Path(args.analysis).is_file():
            raise CLIError(f"analysis file not found: {args.analysis}")
        try:
            analysis = LayerAnalysis.from_json(args.analysis)
        except (ValueError, KeyError, TypeError) as e:
            raise CLIError(f"bad analysis file {args.analysis}: {e}") from None
    model, tok = _load(args)
    exclude = _resolve_layers(args.exclude, _num_layers(model))
    windows = _windows(args, tok, args.text, "calib", args.max_windows)
    result = search(model, windows, args.parallel, args.groups, args.budget, exclude=exclude, analysis=analysis,
                    **_search_kwargs(args))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result.plan.to_json(out)
    if args.report:
        Path(args.report).parent.mkdir(parents=True, exist_ok=True)
        result.to_json(args.report)
    _print_search(result, _num_layers(model), args.rank_metric)
    print(f"wrote {out}" + (f" and {args.report}" if args.report else ""))
    return 0


def _print_search(result, num_layers: int, rank_metric: str) -> None:
    """The calibration table of a search, headed by the metric that ranked the candidates."""
    from .report import format_table

    metric = (result.settings or {}).get("rank_metric", rank_metric)
    print(f"search: candidates ranked by {RANK_METRICS.get(metric, metric)} on the calibration text "
          f"(--rank-metric {metric})")
    rows = [["search", _groups_str(result.plan.groups), result.plan.num_sequential_steps(num_layers),
             result.calib["kl"], result.calib["ppl_increase"] * 100, result.calib["top1_agreement"]]]
    if result.best_contiguous:
        c = result.best_contiguous
        rows.append(["best contiguous", _groups_str(c["groups"]), num_layers - sum(len(g) - 1 for g in c["groups"]),
                     c["kl"], c["ppl_increase"] * 100, c["top1_agreement"]])
    header = ["calibration", "groups", "steps", "KL", "ppl %", "top-1"]
    if metric == "ppl":  # the ranking metric comes first
        header[3], header[4] = header[4], header[3]
        for r in rows:
            r[3], r[4] = r[4], r[3]
    print(format_table(header, rows))


def _groups_str(groups) -> str:
    return " ".join(f"{g[0]}-{g[-1]}" for g in groups) or "(none)"


def cmd_eval(args) -> int:
    from .evaluate import compare_plans
    from .report import format_table

    _check_model_args(args)
    plan = _read_plan_file(args.plan)
    _check_text_file(args.text, "evaluation text")
    _check_out_file(args.out, "--out")
    model, tok = _load(args)
    _check_plan_fits(plan, args.plan, _num_layers(model))
    windows = _windows(args, tok, args.text, "eval", args.max_windows)
    ctx = getattr(args, "dist", None)
    placement = None
    if ctx is not None:
        # the base pass runs before the split, on every rank (each still holds every layer then)
        from .evaluate import base_log_probs, evaluate

        base_lp = base_log_probs(model, windows, batch_size=args.batch_size, progress=_progress(args),
                                 backend=args.backend)
        base = base_lp.result
        placement = _convert_split(model, plan, args, ctx)
        conv = evaluate(model, windows, base_model=base_lp, batch_size=args.batch_size, progress=_progress(args))
    else:
        base, (conv,) = compare_plans(model, windows, [plan], batch_size=args.batch_size, progress=_progress(args),
                                      backend=args.backend, reuse_prefix=False, desc="evaluating")
    n = _num_layers(model)
    steps = plan.num_sequential_steps(n) if plan else n
    print(format_table(
        ["model", "groups", "steps", "perplexity", "ppl %", "KL", "top-1", "tok/s (fwd)"],
        [["base", "(none)", n, base.perplexity, 0.0, 0.0, 1.0, base.tokens_per_second],
         ["cqil", _groups_str(plan.groups) if plan else "(none)", steps, conv.perplexity, conv.ppl_increase * 100,
          conv.kl, conv.top1_agreement, conv.tokens_per_second]]))
    if args.out and (ctx is None or ctx.is_main):
        from .report import environment, write_json

        write_json({"plan": plan.to_dict() if plan else None, "text": windows.to_dict(), "base": base.to_dict(),
                    "converted": conv.to_dict(), "world_size": ctx.world_size if ctx is not None else 1,
                    "placement": placement, "environment": environment()}, args.out)
        print(f"wrote {args.out}")
    return 0


def cmd_generate(args) -> int:
    from .evaluate import plan_applied

    _check_model_args(args)
    plan = _read_plan_file(args.plan)
    _check_out_file(args.out, "--out")
    model, tok = _load(args)
    _check_plan_fits(plan, args.plan, _num_layers(model))
    ctx = getattr(args, "dist", None)
    results, placement = {}, None
    if ctx is not None:
        # every rank generates (greedy: the ranks' logits are bitwise equal, so are their tokens:
        # checked); the sequential base would need every layer on one rank, so it is not run
        import torch

        from .distributed import check_same

        placement = _convert_split(model, plan, args, ctx)
        results["cqil"] = generate_text(model, tok, args.prompt, args.max_new_tokens, not args.no_chat_template)
        check_same(torch.tensor(results["cqil"]["token_ids"]), ctx.group, "generated tokens", ctx.rank, ctx.timeout_s)
    else:
        variants = [("cqil", plan)] + ([] if args.no_base or plan is None else [("base", None)])
        for name, p in variants:
            with plan_applied(model, p, args.backend):
                results[name] = generate_text(model, tok, args.prompt, args.max_new_tokens,
                                              not args.no_chat_template)
    for name, r in results.items():
        label = name if plan is not None else "base"
        print(f"--- {label} ({r['new_tokens']} tokens, {r['tokens_per_second']:.1f} tok/s)")
        print(r["text"])
    if args.out and (ctx is None or ctx.is_main):
        from .report import environment, write_json

        write_json({"plan": plan.to_dict() if plan else None, "outputs": results,
                    "world_size": ctx.world_size if ctx is not None else 1, "placement": placement,
                    "environment": environment()}, args.out)
        print(f"wrote {args.out}")
    return 0


def cmd_main(args) -> int:
    """The main job (``cqil_kernels.main_job``: one function per stage)."""
    from .main_job import cmd_main as run_main_job

    return run_main_job(args)


def _print_calibration(result) -> None:
    from .report import format_table

    rows = []
    for g in result.groups:
        rows.append([_groups_str([g.group]), g.bypass, g.ridge, g.plain_error, g.corrected_error,
                     g.fold_gap, g.tokens.get("fit"), g.seconds])
    print(format_table(["group", "d", "ridge", "err plain", "err corrected", "fold gap", "fit tokens", "s"], rows))
    print(f"calibrated {len(result.groups)} groups in {result.seconds:.1f} s ({result.settings['map']} map, "
          f"{result.settings['target']} target, fold {result.settings['fold']}); errors: held-back output error "
          "relative to the sequential delta")


def cmd_calibrate(args) -> int:
    """--plan + calibration text -> fit + fold per group -> (held-out before/after) -> save."""
    from .calibrate import calibrate
    from .evaluate import compare_plans

    options = _calibrate_kwargs(args)
    if args.text is not None and args.text == args.eval_text:
        raise CLIError("--eval-text is the calibration text: a held-out measure needs another text")
    _check_model_args(args)
    plan = _read_plan_file(args.plan)
    _check_text_file(args.text, "calibration text")
    _check_text_file(args.eval_text, "evaluation text")
    if args.out is not None:
        _check_out_dir(args.out, "--out")
    _check_out_file(args.report, "--report")
    model, tok = _load(args)
    _check_plan_fits(plan, args.plan, _num_layers(model))
    if not plan.parallel_groups:
        raise CLIError(f"plan {args.plan} has no group of 2 or more layers: nothing to calibrate")
    windows = _windows(args, tok, args.text, "calib", args.max_windows)
    evalw = _windows(args, tok, args.eval_text, "eval", args.eval_windows) if args.eval_text else None
    plain = None
    if evalw is not None:
        base, (plain,) = compare_plans(model, evalw, [plan], batch_size=args.batch_size, progress=_progress(args),
                                       backend=args.backend, desc="held-out, before")
    result = calibrate(model, plan, windows, batch_size=args.batch_size, backend=args.backend,
                       keep_original=evalw is not None, progress=_progress(args), **options)
    _print_calibration(result)
    if evalw is not None:
        with result.sequential_original(model):
            _, (after,) = compare_plans(model, evalw, [result.plan], batch_size=args.batch_size,
                                        progress=_progress(args), backend=args.backend, desc="held-out, after")
        result.original_weights = None  # not saved, not needed any more
        print(f"held-out {evalw.source}: perplexity {plain.ppl_increase:+.1%} -> {after.ppl_increase:+.1%}, "
              f"KL {plain.kl:.4f} -> {after.kl:.4f}, top-1 {plain.top1_agreement:.3f} -> {after.top1_agreement:.3f} "
              f"(base perplexity {base.perplexity:.3f})")
    if args.report:
        Path(args.report).parent.mkdir(parents=True, exist_ok=True)
        result.to_json(args.report)
    if args.out:
        model.save_pretrained(args.out)
        tok.save_pretrained(args.out)
        print(f"saved the calibrated model to {args.out} (plan {result.plan.to_json()}; "
              "reload with cqil_kernels.from_pretrained)")
    return 0


def cmd_distill(args) -> int:
    """convert to --plan -> LoRA + KL distillation -> held-out before/after -> save."""
    _check_model_args(args)
    plan = _read_plan_file(args.plan)
    for path, what in ((args.text, "distillation text"), (args.eval_text, "evaluation text"),
                       (args.distill_text, "distillation text")):
        _check_text_file(path, what)
    if args.out:
        _check_out_dir(args.out, "--out")
    _check_out_file(args.distill_out, "--distill-out")
    model, tok = _load(args)
    _check_plan_fits(plan, args.plan, _num_layers(model))
    if not plan.parallel_groups:
        raise CLIError(f"plan {args.plan} has no group of 2 or more layers: nothing to distill")
    evalw = _windows(args, tok, args.eval_text, "eval", args.max_windows)
    res = run_distill_from_args(args, model, tok, plan, eval_windows=evalw)
    before, after = res.before, res.after
    print(f"distilled {res.steps} steps ({res.tokens_seen} tokens, {res.train_seconds:.0f} s): held-out perplexity "
          f"+{before['ppl_increase']:.1%} -> +{after['ppl_increase']:.1%}, KL {before['kl']:.4f} -> {after['kl']:.4f}")
    if args.out:
        model.save_pretrained(args.out)
        tok.save_pretrained(args.out)
        print(f"saved the distilled converted model to {args.out}")
    return 0


# ------------------------------------------------------------------------------------ tune
def _int_list(text: str) -> list[int]:
    """``"1,4"`` -> [1, 4] (positive integers)."""
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v != ""]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return values


def _latency_args(parser: argparse.ArgumentParser):
    """The options of a latency measurement (``cqil_kernels.latency``), shared by tune and bench."""
    g = parser.add_argument_group("latency (measured on --device)")
    g.add_argument("--batch-sizes", type=_int_list, default=[1], help="decode batch sizes (default 1; the first ranks)")
    g.add_argument("--context-lengths", type=_int_list, default=[128],
                   help="decode context (cache) lengths (default 128; the first ranks)")
    g.add_argument("--prompt-len", type=_positive_int, default=128, help="prefill prompt length (default 128)")
    g.add_argument("--decode-steps", type=_positive_int, default=16, help="decode steps per repeat (default 16)")
    g.add_argument("--repeats", type=_positive_int, default=5, help="timed repeats after a warm-up (default 5)")
    g.add_argument("--launch-config", default=None, help="launch-config JSON the engine runs under "
                   "(default: the device's tuned file in the package, else the heuristics)")
    return g


def _latency_settings(args):
    from .latency import LatencySettings

    return LatencySettings(tuple(args.batch_sizes), tuple(args.context_lengths), args.prompt_len, args.decode_steps,
                           args.repeats, backend=args.backend, launch_config=args.launch_config).check()


# ------------------------------------------------------------------------------------ bench
def _add_bench_parser(sub) -> None:
    p = sub.add_parser(
        "bench", help="decode ms/token and prefill ms of a plan on this device (torchrun: split over W ranks)",
        description="Time the model converted to --plan through DecodeEngine on --device (CUDA graph on a GPU, "
        "eager on the CPU): decode ms per step at every --batch-sizes x --context-lengths and prefill ms of "
        "--prompt-len tokens, after an untimed warm-up repeat. Unless --no-compare, the model without groups is "
        "timed first, on one device (under torchrun: every rank alone, before the split), and the table gives "
        "the speed-up. Under torchrun each rank computes its share of every group; rank 0 prints (its clock) "
        "and writes --out.")
    g = p.add_argument_group("model")
    _model_args(g)
    g.add_argument("--no-progress", action="store_true", help="no progress bars (model loading included)")
    g.add_argument("--traceback", action="store_true", help="show the full traceback of errors")
    p.add_argument("--plan", default=None, help="plan JSON (default: none, the model without groups only)")
    p.add_argument("--no-compare", action="store_true", help="do not also time the model without groups")
    p.add_argument("--out", default=None, help="write the times (every repeat) as JSON here")
    _latency_args(p)
    _torchrun_args(p)
    p.set_defaults(func=cmd_bench)


def cmd_bench(args) -> int:
    from .conversion import convert
    from .latency import measure_engine
    from .report import format_table
    from .tuning import device_label

    _check_model_args(args)
    plan = _read_plan_file(args.plan)
    _check_out_file(args.out, "--out")
    settings = _latency_settings(args)
    ctx = getattr(args, "dist", None)
    if ctx is not None and plan is None:
        raise CLIError(f"under torchrun ({ctx.world_size} ranks) bench needs a --plan to split over the ranks")
    model, _ = _load(args)
    n = _num_layers(model)
    _check_plan_fits(plan, args.plan, n)
    results, placement = {}, None
    if plan is None or not args.no_compare:
        results["no groups"] = measure_engine(model, settings)  # one device: before any split
    if plan is not None:
        if ctx is not None:
            placement = _convert_split(model, plan, args, ctx)
        else:
            convert(model, plan, backend=args.backend)
        results["plan"] = measure_engine(model, settings, process_group=ctx.group if ctx is not None else None)
    world = ctx.world_size if ctx is not None else 1
    first = next(iter(results.values()))
    label = device_label(args.device, first.get("cuda_graph"), first.get("backend"))
    rows = []
    base = results.get("no groups")
    for name, r in results.items():
        steps = n if name == "no groups" else plan.num_sequential_steps(n)
        where = "1 device" if name == "no groups" or world == 1 else f"{world} ranks"
        for phase in ("decode", "prefill"):
            for key, st in r[phase].items():
                speedup = None if base is None or name == "no groups" else base[phase][key]["median_ms"] / st["median_ms"]
                rows.append([name, steps, where, f"{phase} {key}", st["median_ms"],
                             f"{st['min_ms']:.3f}-{st['max_ms']:.3f}", speedup])
    print(f"latency on {label}" + (f"; rank 0's clock of {world}" if world > 1 else ""))
    if plan is not None:
        print(f"plan: {_groups_str(plan.groups)}, bypass {plan.bypass}")
    print(format_table(["model", "seq. steps", "on", "what", "median ms", "min-max ms", "speed-up"], rows))
    if args.out and (ctx is None or ctx.is_main):
        from .report import environment, write_json

        write_json({"plan": plan.to_dict() if plan else None, "world_size": world, "placement": placement,
                    "device": label, "settings": {"batch_sizes": list(settings.batch_sizes),
                                                  "context_lengths": list(settings.context_lengths),
                                                  "prompt_len": settings.prompt_len,
                                                  "decode_steps": settings.decode_steps, "repeats": settings.repeats},
                    "results": results, "environment": environment(args.device)}, args.out)
        print(f"wrote {args.out}")
    return 0


def _add_tune_parser(sub) -> None:
    p = sub.add_parser(
        "tune", help="measure candidate plans for latency here and quality on text; recommend one",
        description="Candidate plans (no groups; search results for N = 1..--max-groups at each --parallel; "
        "the paper's S/E/P plans; --plans files) are timed with DecodeEngine on --device (CUDA graph on a GPU, "
        "eager on the CPU) and measured for quality on calibration text (search's measurements reused). "
        "Prints a Pareto table, writes tune.json, tune.png and the recommended plan.json (fastest within the "
        "quality budget) into --out. With --kernels: sweep kernel tiles on a GPU and write the per-device "
        "launch-config file instead.")
    _common(p, max_windows=4)
    p.add_argument("--text", "--calib-text", dest="text", default=None,
                   help="calibration text file (default: built-in text, calibration half)")
    g = p.add_argument_group("candidate plans")
    g.add_argument("--parallel", type=_int_list, default=[2, 3, 4], help="group sizes P to search (default 2,3,4)")
    g.add_argument("--max-groups", type=_positive_int, default=4, help="search N = 1..this many groups (default 4)")
    g.add_argument("--plans", nargs="+", default=[], metavar="PLAN_JSON", help="also measure these plan files")
    g.add_argument("--no-search", action="store_true", help="no search: no groups, paper plans and --plans only")
    g.add_argument("--no-paper", action="store_true", help="leave out the paper's S/E/P plans")
    g.add_argument("--exclude", type=_layer_list, default=[], help="layers no searched group may touch")
    g.add_argument("--bypass", type=int, default=0, help="bypass distance d of searched plans (default 0)")
    g.add_argument("--beam", type=_positive_int, default=4, help="search: candidates measured per step (default 4)")
    g.add_argument("--seed", type=int, default=0, help="search tie-break seed (default 0)")
    g = _latency_args(p)
    g.add_argument("--world-size", type=int, default=None,
                   help="add the MODELED step on W devices (cqil_kernels.distributed.latency_model)")
    g.add_argument("--allreduce-us", type=_nonneg_float, default=20.0,
                   help="all-reduce latency assumed by --world-size (default 20 us: NCCL on H100 NVLink)")
    g = p.add_argument_group("recommendation")
    g.add_argument("--budget-ppl", type=_nonneg_float, default=None,
                   help="largest relative perplexity increase on calibration text (default 0.10 = +10%%)")
    g.add_argument("--budget-kl", type=_nonneg_float, default=None, help="or: largest mean KL (nats/token)")
    p.add_argument("--out", default="reports/tune", help="folder for tune.json, tune.png, plan.json (default reports/tune)")
    g = p.add_argument_group("kernel tuning (GPU)")
    g.add_argument("--kernels", action="store_true",
                   help="sweep tiles, warps, stages and split counts of the model's decode GEMMs (M = batch) and "
                   "write the per-device launch-config JSON into --out (CUDA only)")
    g.add_argument("--install", action="store_true",
                   help="with --kernels: also copy the file into the package, where launches on this device find it")
    g.add_argument("--time-budget", type=_nonneg_float, default=420.0,
                   help="with --kernels: stop sweeping after this many seconds, keeping the best so far (default 420)")
    g.add_argument("--quick", action="store_true", help="with --kernels: a small candidate grid")
    g.add_argument("--kernel-dtype", default="bfloat16", help="with --kernels: the weights' dtype (default bfloat16)")
    p.set_defaults(func=cmd_tune)


def _tune_budget(args) -> dict:
    if args.budget_ppl is not None and args.budget_kl is not None:
        raise CLIError("give one quality budget: --budget-ppl or --budget-kl")
    return {"budget_ppl": args.budget_ppl, "budget_kl": args.budget_kl}


def cmd_tune(args) -> int:
    """candidates -> quality (cached, search's reused) -> latency here -> Pareto table, plot, plan.json."""
    if args.kernels:
        return _cmd_tune_kernels(args)
    from .tuning import Candidate, tune

    budget = _tune_budget(args)
    if args.world_size is not None and args.world_size < 2:
        raise CLIError(f"--world-size must be >= 2 (the modeled devices), got {args.world_size}")
    if args.launch_config is not None and not Path(args.launch_config).is_file():
        raise CLIError(f"launch config not found: {args.launch_config}")
    _check_model_args(args)
    _check_text_file(args.text, "calibration text")
    files = [(path, _read_plan_file(path)) for path in args.plans]
    model, tok = _load(args)
    n = _num_layers(model)
    for path, plan in files:
        _check_plan_fits(plan, path, n)
    plans = [Candidate(f"file {Path(path).stem}", plan, f"file {path}") for path, plan in files]
    exclude = _resolve_layers(args.exclude, n)
    windows = _windows(args, tok, args.text, "calib", args.max_windows)
    t0 = time.perf_counter()
    result = tune(model, windows, parallel=args.parallel, max_groups=args.max_groups, plans=plans,
                  run_search=not args.no_search, include_paper=not args.no_paper, **budget,
                  batch_sizes=args.batch_sizes, context_lengths=args.context_lengths, prompt_len=args.prompt_len,
                  decode_steps=args.decode_steps, repeats=args.repeats, world_size=args.world_size,
                  allreduce_us=args.allreduce_us, backend=args.backend, launch_config=args.launch_config,
                  search_kwargs=dict(exclude=exclude, bypass=args.bypass, beam=args.beam, seed=args.seed),
                  batch_size=args.batch_size, progress=_progress(args))
    print(result.table())
    paths = result.write(args.out)
    print(f"tuned in {time.perf_counter() - t0:.0f} s; wrote {paths['json']}, {paths['png']} and {paths['plan']} "
          f"(python -m cqil_kernels convert/eval --plan {paths['plan']})")
    return 0


def _cmd_tune_kernels(args) -> int:
    import torch

    from . import kernel_tuning

    device = torch.device(args.device)
    if device.type != "cuda":
        raise CLIError(f"tune --kernels needs a CUDA GPU (--device cuda), not {device}: Triton interpreter timings "
                       "on a CPU say nothing about the GPU kernels")
    if not torch.cuda.is_available():
        raise CLIError("tune --kernels: CUDA is not available in this torch build or machine")
    from .loading import load_model, parse_dtype

    model, _ = load_model(args.model, dtype="float32", device="cpu")  # only its shapes are used
    result = kernel_tuning.tune_kernels(model.config, device=device, dtype=parse_dtype(args.kernel_dtype),
                                        batch_sizes=args.batch_sizes,
                                        parallel=[1] + [p for p in args.parallel if p > 1],
                                        context_length=args.context_lengths[0], quick=args.quick,
                                        time_budget_s=args.time_budget, progress=_progress(args))
    print(result.table())
    paths = result.write(args.out, install=args.install)
    print("wrote " + ", ".join(str(v) for v in paths.values()))
    return 0


def add_main_tune_arguments(parser: argparse.ArgumentParser) -> None:
    """The main job's closing tuning table (``main_job.main_tuning_table``)."""
    g = parser.add_argument_group("closing tuning table (latency of the measured plans on --device)")
    g.add_argument("--no-tune", action="store_true", help="skip the closing latency / quality table")
    g.add_argument("--tune-budget-ppl", type=_nonneg_float, default=0.10,
                   help="quality budget of its recommendation (calibration perplexity change, default 0.10)")
    g.add_argument("--tune-context", type=_positive_int, default=64, help="its decode context length (default 64)")
    g.add_argument("--tune-steps", type=_positive_int, default=8, help="its decode steps per repeat (default 8)")
    g.add_argument("--tune-repeats", type=_positive_int, default=3, help="its timed repeats (default 3)")


# ------------------------------------------------------------------------------------ entry point
@contextmanager
def _ranks(args):
    """The torchrun run this command is one rank of (a ``DistContext``), or None in one process.

    Only ``TORCHRUN_COMMANDS`` join a run of several processes. Ranks other than 0 print nothing
    to stdout and show no progress bars (rank 0 alone prints and writes ``--out``); errors still
    reach every rank's stderr. The process group ends with the command.
    """
    from .distributed.launch import LaunchEnv

    env = LaunchEnv.from_environ()  # half-set launcher variables: ValueError naming them
    if env is None or env.world_size == 1:
        yield None
        return
    if args.command not in TORCHRUN_COMMANDS:
        raise CLIError(f"'{args.command}' runs in one process; under torchrun ({env.world_size} ranks) only "
                       f"{', '.join(TORCHRUN_COMMANDS)} run")
    from .distributed import destroy, init

    # "cpu": the ranks compute on the CPU (gloo); a CUDA device: rank r on cuda:LOCAL_RANK (NCCL)
    ctx = init(timeout=args.dist_timeout, device="cpu" if str(args.device) == "cpu" else None)
    try:
        args.device = str(ctx.device)
        if ctx.is_main:
            yield ctx
        else:
            args.no_progress = True
            with open(os.devnull, "w") as null, redirect_stdout(null):
                yield ctx
    finally:
        destroy(ctx)


def _convert_split(model, plan, args, ctx):
    """Convert ``model`` to ``plan`` split over the run's ranks; the placement's report data."""
    from .conversion import convert, placement_of

    if plan is None or not plan.parallel_groups:
        raise CLIError(f"under torchrun ({ctx.world_size} ranks) --plan must have groups of 2 or more layers to "
                       "split over the ranks")
    convert(model, plan, backend=args.backend, process_group=ctx.group)
    return placement_of(model)[0].to_dict()


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with _ranks(args) as ctx:
            args.dist = ctx
            return args.func(args)
    except CLIError as e:
        if getattr(args, "traceback", False):
            raise
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (OSError, ImportError, ValueError, TypeError) as e:
        # Raised by loading, texts, plan validation and file writes with messages that name the
        # problem (OSError includes FileNotFoundError and a disk that fills up while writing).
        if getattr(args, "traceback", False):
            raise
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return EXIT_USAGE


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 400 else text[:397] + "..."


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
