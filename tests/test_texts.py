"""Default text, file reading, paragraph re-joining and token windows."""

from __future__ import annotations

import pytest
import torch

from cqil_kernels.texts import TokenWindows, default_text, load_windows, make_windows, read_text, unwrap_paragraphs


class CharTokenizer:
    """One token per character (ids 0..255): enough to test windowing exactly."""

    def __call__(self, text, add_special_tokens=False, verbose=True):
        return {"input_ids": [ord(c) % 256 for c in text]}


def test_unwrap_joins_hard_wrapped_lines_and_keeps_paragraphs():
    text = "It is a truth\nuniversally acknowledged.\n\n\nSecond\r\nparagraph here.\n"
    assert unwrap_paragraphs(text) == "It is a truth universally acknowledged.\n\nSecond paragraph here."


def test_unwrap_keeps_indented_blocks_and_drops_heading_underlines():
    text = "Title\n*****\n\nSome text\nwrapped.\n\n   code line 1\n   code line 2\n"
    assert unwrap_paragraphs(text) == "Title\n\nSome text wrapped.\n\n   code line 1\n   code line 2"


def test_default_text_splits_are_disjoint_deterministic_and_cover_all():
    calib, evalt, whole = default_text("calib"), default_text("eval"), default_text("all")
    assert calib == default_text("calib")
    assert len(calib) > 100_000 and len(evalt) > 100_000
    calib_paras, eval_paras = set(calib.split("\n\n")), set(evalt.split("\n\n"))
    assert not calib_paras & eval_paras  # topics repeat paragraphs of others: deduplicated
    assert set(whole.split("\n\n")) == calib_paras | eval_paras
    with pytest.raises(ValueError, match="unknown split"):
        default_text("train")


def test_read_text(tmp_path):
    f = tmp_path / "novel.txt"
    f.write_bytes("\ufeffChapter 1\n\nIt is a truth\nuniversally acknowledged.\n".encode("utf-8"))
    assert read_text(f) == "Chapter 1\n\nIt is a truth universally acknowledged."
    with pytest.raises(FileNotFoundError, match="not found"):
        read_text(tmp_path / "missing.txt")
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match="not UTF-8"):
        read_text(bad)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match="empty"):
        read_text(empty)


def _scored_positions(w: TokenWindows, begins):
    out = []
    for i, b in enumerate(begins):
        out.extend(range(b + int(w.score_from[i]), b + w.seq_len))
    return out


@pytest.mark.parametrize("n,seq_len,stride", [(100, 10, None), (103, 10, None), (103, 10, 4), (50, 16, 5), (7, 10, None)])
def test_windows_score_every_token_once(n, seq_len, stride):
    text = "".join(chr(65 + i % 26) for i in range(n))
    w = make_windows(CharTokenizer(), text, seq_len=seq_len, stride=stride)
    t = min(seq_len, n)
    assert w.input_ids.shape[1] == t
    ids = [ord(c) for c in text]
    # Recover each window's start from its content (the text has period 26; check positions directly).
    begins = []
    step = min(stride or t, t)
    b = 0
    while True:
        if b + t >= n:
            begins.append(n - t)
            break
        begins.append(b)
        b += step
    begins = sorted(set(begins))
    assert len(begins) == len(w)
    for i, b in enumerate(begins):
        assert w.input_ids[i].tolist() == ids[b : b + t]
    scored = _scored_positions(w, begins)
    assert len(scored) == len(set(scored)) == w.num_scored  # no token scored twice
    if step < t:
        assert sorted(scored) == list(range(1, n))  # strided: every token but the first
    else:
        # non-overlapping (the HF recipe): a window cannot predict its own first token
        unscored = set(range(1, n)) - set(scored)
        assert unscored == {b for b in begins[1:] if b % t == 0}


def test_score_mask_matches_score_from():
    w = TokenWindows(torch.zeros(3, 6, dtype=torch.long), torch.tensor([1, 3, 5]), stride=6)
    mask = w.score_mask()
    assert mask.shape == (3, 5)
    assert mask.sum(1).tolist() == [5, 3, 1]
    assert w.score_mask(1, 2).tolist() == [[False, False, True, True, True]]


def test_max_windows_spreads_non_overlapping_windows():
    text = "".join(chr(65 + i % 26) for i in range(1000))
    w = make_windows(CharTokenizer(), text, seq_len=10, max_windows=4)
    assert len(w) == 4
    assert w.score_from.tolist() == [1, 1, 1, 1]  # not adjacent: each window scores all it can
    firsts = w.input_ids[:, 0].tolist()
    assert firsts[0] == 65 and len(set(firsts)) > 1  # the first window and others further on


def test_max_windows_keeps_strided_chain():
    text = "".join(chr(65 + i % 26) for i in range(1000))
    w = make_windows(CharTokenizer(), text, seq_len=10, stride=5, max_windows=3)
    assert w.score_from.tolist() == [1, 5, 5]


def test_window_argument_errors():
    with pytest.raises(ValueError, match="seq_len"):
        make_windows(CharTokenizer(), "abc", seq_len=1)
    with pytest.raises(ValueError, match="stride"):
        make_windows(CharTokenizer(), "abcdef", seq_len=4, stride=5)
    with pytest.raises(ValueError, match="at least 2"):
        make_windows(CharTokenizer(), "a", seq_len=4)
    with pytest.raises(ValueError, match="score_from"):
        TokenWindows(torch.zeros(1, 4, dtype=torch.long), torch.tensor([0]), stride=4)


def test_load_windows_default_and_file(tmp_path):
    w = load_windows(CharTokenizer(), None, split="eval", seq_len=64, max_windows=3)
    assert w.input_ids.shape == (3, 64) and "eval" in w.source
    f = tmp_path / "t.txt"
    f.write_text("hello world " * 20)
    w = load_windows(CharTokenizer(), f, seq_len=32)
    assert w.source == str(f) and w.to_dict()["scored_tokens"] == w.num_scored
