"""Text for calibration and evaluation, and its cut into fixed-length token windows.

The default text ships with CPython (``pydoc_data.topics``: the language reference topics), so
the project needs no data download. It is split into a calibration half and an evaluation half
by alternating sorted topic names: the two never share a topic, and both cover the whole range.
Any UTF-8 file can be used instead; hard-wrapped paragraphs are re-joined into one line each.

Windows follow the usual HF recipe for causal-LM perplexity: windows of ``seq_len`` tokens every
``stride`` tokens; in each window only the tokens that no earlier window scored are scored, so every
token is predicted once, with up to ``seq_len - stride`` tokens of extra context.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = [
    "TokenWindows",
    "default_text",
    "read_text",
    "unwrap_paragraphs",
    "make_windows",
    "load_windows",
    "SPLITS",
]

SPLITS = ("all", "calib", "eval")

# reST-style heading underlines in pydoc topics ("*****", "=====", "-----").
_UNDERLINE = re.compile(r"^\s*([*=\-~^#+])\1{2,}\s*$")


def unwrap_paragraphs(text: str) -> str:
    """Re-join hard-wrapped lines: one line per paragraph, paragraphs separated by a blank line.

    Paragraphs with indented lines (code, grammar rules, verse) keep their line breaks, since
    joining them would produce text the model never sees in that form. Heading underlines are
    dropped.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    paragraphs = []
    for block in re.split(r"\n[ \t]*\n+", text):
        lines = [line.rstrip() for line in block.split("\n") if line.strip() and not _UNDERLINE.match(line)]
        if not lines:
            continue
        if any(line[:1].isspace() for line in lines):
            paragraphs.append("\n".join(lines))
        else:
            paragraphs.append(" ".join(line.strip() for line in lines))
    return "\n\n".join(paragraphs)


def default_text(split: str = "all") -> str:
    """The built-in text: CPython's ``pydoc_data.topics``, topics in sorted order.

    Args:
        split: ``"all"``; ``"calib"`` (topics 0, 2, 4, ... of the sorted names) or ``"eval"``
            (topics 1, 3, 5, ...).

    Several topics repeat whole paragraphs of others; every paragraph is kept only where it first
    appears (in sorted topic order), so calibration and evaluation never share a paragraph.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {SPLITS}")
    from pydoc_data.topics import topics

    seen: set[str] = set()
    parts = []
    for index, name in enumerate(sorted(topics)):
        paragraphs = [p for p in unwrap_paragraphs(topics[name]).split("\n\n") if p not in seen]
        seen.update(paragraphs)
        if split == "all" or (split == "calib") == (index % 2 == 0):
            parts.extend(paragraphs)
    return "\n\n".join(parts)


def read_text(path: str | os.PathLike) -> str:
    """A UTF-8 text file (a BOM is ignored), with hard-wrapped paragraphs re-joined."""
    path = Path(os.fspath(path)).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"text file not found: {path}")
    try:
        raw = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"text file {path} is not UTF-8: {e}") from None
    text = unwrap_paragraphs(raw)
    if not text.strip():
        raise ValueError(f"text file {path} is empty")
    return text


@dataclass
class TokenWindows:
    """Fixed-length token windows and which of their tokens are scored.

    Attributes:
        input_ids: [W, T] int64 token ids.
        score_from: [W] int64; in window ``w`` the tokens at positions ``p >= score_from[w]`` are
            predicted (from the logits at ``p - 1``) and scored; ``score_from >= 1`` always.
        stride: tokens between window starts (``T`` for non-overlapping windows).
        source: a short description of the text, for reports.
    """

    input_ids: torch.Tensor
    score_from: torch.Tensor
    stride: int
    source: str = ""

    def __post_init__(self):
        if self.input_ids.dim() != 2 or self.score_from.shape != (self.input_ids.shape[0],):
            raise ValueError("input_ids must be [W, T] and score_from [W]")
        if self.input_ids.shape[1] < 2:
            raise ValueError("windows need at least 2 tokens")
        if bool((self.score_from < 1).any()) or bool((self.score_from >= self.seq_len).any()):
            raise ValueError("score_from must lie in [1, T)")

    @property
    def seq_len(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def num_scored(self) -> int:
        """Tokens predicted in total (each token of the text at most once)."""
        return int((self.seq_len - self.score_from).sum())

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def score_mask(self, start: int = 0, end: int | None = None) -> torch.Tensor:
        """[w, T-1] bool for windows ``start:end``: column ``p-1`` is True when token ``p`` is scored.

        Aligned with ``logits[:, :-1]`` (which predict ``input_ids[:, 1:]``).
        """
        score_from = self.score_from[start:end]
        positions = torch.arange(1, self.seq_len)
        return positions[None, :] >= score_from[:, None]

    def to_dict(self) -> dict:
        return {
            "source": self.source,
            "windows": len(self),
            "seq_len": self.seq_len,
            "stride": self.stride,
            "scored_tokens": self.num_scored,
        }


def _tokenize(tokenizer, text: str) -> list[int]:
    # verbose=False: the text is longer than the model's context on purpose (it is cut below).
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return list(ids)


def make_windows(
    tokenizer,
    text: str,
    seq_len: int = 1024,
    stride: int | None = None,
    max_windows: int | None = None,
    source: str = "",
) -> TokenWindows:
    """Tokenize ``text`` and cut it into windows of ``seq_len`` tokens.

    Args:
        tokenizer: a HF tokenizer (called without special tokens).
        text: the text.
        seq_len: tokens per window ``T``; a text shorter than that gives one shorter window.
        stride: tokens between window starts; ``None`` means ``seq_len`` (non-overlapping). The
            last window is moved back to end at the last token, so all windows have length ``T``.
        max_windows: keep at most this many windows: evenly spaced over the text for
            non-overlapping windows (a more representative sample than the first few), the first
            ones for strided windows (which need their predecessors as context).

    Returns:
        TokenWindows with ``input_ids`` [W, T].

    Example:
        >>> w = make_windows(tok, default_text("eval"), seq_len=512, max_windows=8)  # doctest: +SKIP
        >>> w.input_ids.shape                                                        # doctest: +SKIP
        torch.Size([8, 512])
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    stride = seq_len if stride is None else stride
    if not 1 <= stride <= seq_len:
        raise ValueError(f"stride must be in [1, seq_len={seq_len}], got {stride}")
    if max_windows is not None and max_windows < 1:
        raise ValueError(f"max_windows must be >= 1, got {max_windows}")
    ids = _tokenize(tokenizer, text)
    n = len(ids)
    if n < 2:
        raise ValueError(f"text has {n} tokens; need at least 2")
    seq_len = min(seq_len, n)
    stride = min(stride, seq_len)

    # Window start positions; the last one ends exactly at the end of the text.
    begins = list(range(0, n - seq_len + 1, stride))
    if begins[-1] + seq_len < n:
        begins.append(n - seq_len)
    if max_windows is not None and len(begins) > max_windows:
        if stride == seq_len:
            picks = torch.linspace(0, len(begins) - 1, max_windows).round().long().tolist()
            begins = [begins[i] for i in sorted(set(picks))]
        else:
            begins = begins[:max_windows]

    # Score only tokens that no earlier (kept) window scored.
    score_from, previous_end = [], 0
    for begin in begins:
        score_from.append(max(1, previous_end - begin))
        previous_end = begin + seq_len
    data = torch.tensor(ids, dtype=torch.long)
    input_ids = torch.stack([data[b : b + seq_len] for b in begins])
    return TokenWindows(input_ids, torch.tensor(score_from, dtype=torch.long), stride, source)


def load_windows(
    tokenizer,
    path: str | os.PathLike | None = None,
    split: str = "all",
    seq_len: int = 1024,
    stride: int | None = None,
    max_windows: int | None = None,
) -> TokenWindows:
    """Windows of a UTF-8 file, or of the default text's ``split`` when ``path`` is None."""
    if path is None:
        text, source = default_text(split), f"pydoc_data.topics[{split}]"
    else:
        text, source = read_text(path), str(path)
    return make_windows(tokenizer, text, seq_len=seq_len, stride=stride, max_windows=max_windows, source=source)
