"""The command line end to end on a tiny saved model, and its errors (exit status 2)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from cqil_kernels.cli import main
from test_loading import save_tiny_model

CHAT = "{% for m in messages %}<s>{{ m['content'] }}</s>{% endfor %}{% if add_generation_prompt %}<s>{% endif %}"
FAST = ["--seq-len", "24", "--no-progress"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_model")
    save_tiny_model(path, num_layers=6, chat_template=CHAT)
    return path


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text(("It is a truth universally acknowledged, that a single man in possession\n"
                     "of a good fortune, must be in want of a wife.\n\n") * 30, encoding="utf-8")
    return path


def run(*args) -> int:
    return main([str(a) for a in args])


def test_analyze(tiny_dir, text_file, tmp_path, capsys):
    out = tmp_path / "a" / "analysis.json"
    assert run("analyze", "--model", tiny_dir, "--text", text_file, "--max-windows", 2, "--out", out, *FAST) == 0
    data = json.loads(out.read_text())
    assert data["num_layers"] == 6 and len(data["costs"]) == 5
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    assert "base perplexity" in capsys.readouterr().out


def test_search_then_eval_then_generate(tiny_dir, text_file, tmp_path, capsys):
    plan = tmp_path / "plan.json"
    report = tmp_path / "search.json"
    assert run("search", "--model", tiny_dir, "--calib-text", text_file, "--parallel", 2, "--groups", 2,
               "--exclude", "0,-1", "--max-windows", 2, "--out", plan, "--report", report, *FAST) == 0
    data = json.loads(plan.read_text())
    assert set(data) == {"groups", "bypass"} and len(data["groups"]) == 2
    assert not {0, 5} & {layer for g in data["groups"] for layer in g}
    assert json.loads(report.read_text())["plan"] == data

    results = tmp_path / "eval.json"
    assert run("eval", "--model", tiny_dir, "--plan", plan, "--eval-text", text_file, "--max-windows", 2,
               "--out", results, *FAST) == 0
    r = json.loads(results.read_text())
    assert r["converted"]["kl"] >= 0 and r["base"]["perplexity"] > 1 and r["plan"] == data
    assert "perplexity" in capsys.readouterr().out

    gen = tmp_path / "gen.json"
    assert run("generate", "--model", tiny_dir, "--plan", plan, "--prompt", "a wife", "--max-new-tokens", 5,
               "--out", gen, *FAST) == 0
    g = json.loads(gen.read_text())
    assert set(g["outputs"]) == {"cqil", "base"} and g["outputs"]["cqil"]["new_tokens"] <= 5


def test_eval_and_generate_without_plan_default_text(tiny_dir, capsys):
    assert run("eval", "--model", tiny_dir, "--max-windows", 1, *FAST) == 0
    assert run("generate", "--model", tiny_dir, "--max-new-tokens", 3, "--no-chat-template", *FAST) == 0
    assert "--- base" in capsys.readouterr().out


def test_search_with_budget_and_saved_analysis(tiny_dir, text_file, tmp_path):
    analysis = tmp_path / "analysis.json"
    assert run("analyze", "--model", tiny_dir, "--text", text_file, "--max-windows", 1, "--out", analysis, *FAST) == 0
    plan = tmp_path / "plan.json"
    assert run("search", "--model", tiny_dir, "--text", text_file, "--budget", "0.5", "--budget-metric", "kl",
               "--analysis", analysis, "--max-windows", 1, "--out", plan, "--beam", 2, *FAST) == 0
    assert "groups" in json.loads(plan.read_text())


def test_main_job(tiny_dir, text_file, tmp_path, capsys):
    out = tmp_path / "reports"
    assert run("main", "--model", tiny_dir, "--calib-text", text_file, "--groups", 2, "--calib-windows", 2,
               "--eval-windows", 2, "--max-new-tokens", 4, "--beam", 2, "--out", out, "--distill-steps", 0, *FAST) == 0
    for name in ("main.json", "plan.json", "search.json", "analysis.json", "analysis.png",
                 "tune.json", "tune.png", "tune_plan.json"):  # the closing tuning table's files too
        assert (out / name).is_file(), name
    report = json.loads((out / "main.json").read_text())
    assert report["num_layers"] == 6 and len(report["plan"]["groups"]) == 2
    assert report["evaluation"]["search_plan"]["kl"] >= 0
    assert "pydoc_data.topics[eval]" in report["evaluation"]["text"]["source"]
    printed = capsys.readouterr().out
    assert "seq. steps" in printed and "cqil (search)" in printed
    assert "CPU latencies" in printed and "<- recommended" in printed



def test_main_job_with_distillation(tiny_dir, text_file, tmp_path, capsys):
    out = tmp_path / "reports"
    assert run("main", "--model", tiny_dir, "--calib-text", text_file, "--groups", 1, "--calib-windows", 2,
               "--eval-windows", 2, "--max-new-tokens", 2, "--beam", 1, "--out", out,
               "--distill-steps", 3, "--distill-seq-len", 24, "--distill-windows", 4, "--distill-batch-size", 2,
               *FAST) == 0
    report = json.loads((out / "main.json").read_text())
    assert report["distillation"]["steps"] == 3
    assert "distilled 3 steps" in capsys.readouterr().out


def test_distill_command_saves_a_reloadable_converted_model(tiny_dir, text_file, tmp_path, capsys):
    import cqil_kernels as ck

    plan = tmp_path / "plan.json"
    ck.CQILPlan([[2, 3]]).to_json(plan)
    out = tmp_path / "distilled"
    assert run("distill", "--model", tiny_dir, "--plan", plan, "--text", text_file, "--eval-text", text_file,
               "--max-windows", 2, "--distill-steps", 4, "--distill-seq-len", 24, "--distill-windows", 4,
               "--distill-batch-size", 2, "--out", out, *FAST) == 0
    assert "held-out perplexity" in capsys.readouterr().out
    model = ck.from_pretrained(out, backend="torch")
    assert ck.get_plan(model) == ck.CQILPlan([[2, 3]])

@pytest.mark.parametrize(
    "argv, message",
    [
        (["eval", "--model", "{tiny}", "--text", "/no/such/file.txt"], "text file not found"),
        (["eval", "--model", "/no/such/model"], "model path not found"),
        (["eval", "--model", "not-a-model"], "unknown model"),
        (["eval", "--model", "{tiny}", "--plan", "/no/plan.json"], "plan file not found"),
        (["eval", "--model", "{tiny}", "--plan", "{bad_json}"], "not valid JSON"),
        (["eval", "--model", "{tiny}", "--plan", "{out_of_range}"], "out of range"),
        (["generate", "--model", "{tiny}", "--plan", "{overlap}"], "overlaps"),
        (["search", "--model", "{tiny}"], "--groups N, --budget B"),
        (["search", "--model", "{tiny}", "--groups", "9"], "only 3 disjoint groups"),
        (["search", "--model", "{tiny}", "--groups", "1", "--exclude", "7"], "out of range"),
        (["search", "--model", "{tiny}", "--groups", "1", "--analysis", "/no/a.json"], "analysis file not found"),
    ],
)
def test_errors_exit_2_with_a_clear_message(argv, message, tiny_dir, tmp_path, capsys):
    files = {"tiny": str(tiny_dir)}
    for name, content in (("bad_json", "{groups: "), ("out_of_range", '{"groups": [[5, 6]]}'),
                          ("overlap", '{"groups": [[1, 2], [2, 3]]}')):
        (tmp_path / f"{name}.json").write_text(content)
        files[name] = str(tmp_path / f"{name}.json")
    argv = [a.format(**files) for a in argv] + FAST + ["--max-windows", "1"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_bad_argument_values_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["search", "--groups", "0"])
    assert e.value.code == 2
    assert "positive integer" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["frobnicate"])
    assert e.value.code == 2


@pytest.fixture(scope="module")
def broken_models(tiny_dir, tmp_path_factory):
    """Copies of the tiny model: one without weights, one with a truncated safetensors file."""
    import shutil

    root = tmp_path_factory.mktemp("broken")
    no_weights = root / "no_weights"
    shutil.copytree(tiny_dir, no_weights)
    (no_weights / "model.safetensors").unlink()
    truncated = root / "truncated"
    shutil.copytree(tiny_dir, truncated)
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    return {"no_weights": str(no_weights), "truncated": str(truncated)}


def one_line_error(capsys) -> str:
    """The one line an error prints (after the progress log lines of loading, if any)."""
    err = capsys.readouterr().err.strip()
    lines = [line for line in err.splitlines() if not line.startswith(("loaded ", "text "))]
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["eval", "--plan", "{folder}"], "is a folder, not a plan JSON file"),
        (["eval", "--model", "{no_weights}"], "has a config.json but no weights"),
        (["eval", "--model", "{truncated}"], "damaged or truncated"),
        (["eval", "--device", "bogus"], "unknown device 'bogus'"),
        (["eval", "--device", "cuda:7"], "is not available"),
        (["analyze", "--out", "{regular_file}/sub/analysis.json"], "is a file, not a folder"),
        (["main", "--out", "{regular_file}/reports"], "is a file, not a folder"),
        (["main", "--out", "{regular_file}"], "exists and is not a folder"),
        (["distill", "--plan", "{plan}", "--out", "{regular_file}/model"], "is a file, not a folder"),
        (["search", "--groups", "1", "--report", "{folder}"], "is a folder; give a file name"),
        (["main", "--calib-text", "/no/such/calib.txt"], "text file not found"),
        (["main", "--eval-text", "{folder}"], "is a folder, not a text file"),
        (["distill", "--plan", "{plan}", "--distill-text", "/no/such/d.txt"], "text file not found"),
        (["eval", "--text", "{not_utf8}"], "not UTF-8"),
        (["search", "--groups", "1", "--exclude", "7"], "out of range"),
    ],
)
def test_input_errors_are_one_line_and_found_before_the_model_loads(argv, message, tiny_dir, broken_models, tmp_path,
                                                                     capsys, monkeypatch):
    import cqil_kernels.loading as loading

    files = {"tiny": str(tiny_dir), "folder": str(tmp_path), **broken_models}
    (tmp_path / "regular").write_text("not a folder")
    files["regular_file"] = str(tmp_path / "regular")
    (tmp_path / "plan.json").write_text('{"groups": [[1, 2]]}')
    files["plan"] = str(tmp_path / "plan.json")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 ".encode("latin-1") * 10)
    files["not_utf8"] = str(tmp_path / "latin1.txt")
    argv = [a.format(**files) for a in argv]
    if "--model" not in argv:
        argv += ["--model", str(tiny_dir)]
    loads = []
    real_load = loading.load_model
    # every problem except the layer range is found before the model is loaded
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: loads.append(1) or real_load(*a, **k))
    assert main(argv + FAST + ["--max-windows", "1"]) == 2
    assert message in one_line_error(capsys)
    assert loads == ([1] if "--exclude" in argv else [])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", "--prompt", ""], "the prompt is empty"),
        (["generate", "--prompt", "   "], "the prompt is empty"),
        (["main", "--distill-steps", "-1"], "integer >= 0"),
        (["distill", "--plan", "p.json", "--distill-steps", "0"], "positive integer"),
        (["main", "--distill-lr", "-0.1"], "number > 0"),
        (["main", "--distill-lr", "nan"], "number > 0"),
        (["generate", "--max-new-tokens", "-3"], "positive integer"),
        (["search", "--groups", "1", "--swap-rounds", "-1"], "integer >= 0"),
        (["search", "--groups", "1", "--contiguous-top", "-2"], "integer >= -1"),
        (["analyze", "--bypass", "-1"], "integer >= 0"),
        (["eval", "--backend", "cuda"], "invalid choice"),
    ],
)
def test_bad_values_are_refused_by_the_parser_in_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert message in one_line_error(capsys)


def test_main_help_shows_the_defaults_main_uses(capsys):
    from cqil_kernels.cli import MAIN_DISTILL, build_parser

    with pytest.raises(SystemExit):
        main(["main", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    args = build_parser().parse_args(["main"])
    assert args.distill_lr == MAIN_DISTILL["lr"] and args.distill_target == MAIN_DISTILL["target"]
    assert args.distill_steps == MAIN_DISTILL["default_steps"] and args.distill_max_seconds == 0
    assert f"AdamW learning rate (default {MAIN_DISTILL['lr']})" in text
    assert f"layers that get adapters (default {MAIN_DISTILL['target']})" in text
    assert f"optimizer steps (default {MAIN_DISTILL['default_steps']};" in text


def test_no_progress_silences_the_loading_bars(tiny_dir, capfd):
    assert run("eval", "--model", tiny_dir, "--max-windows", 1, *FAST) == 0
    err = capfd.readouterr().err
    assert "Loading weights" not in err and "%|" not in err


def test_search_table_names_the_ranking_metric(tiny_dir, text_file, tmp_path, capsys):
    for metric, name in (("kl", "KL(base || converted)"), ("ppl", "perplexity increase")):
        assert run("search", "--model", tiny_dir, "--text", text_file, "--groups", 1, "--rank-metric", metric,
                   "--max-windows", 1, "--beam", 1, "--out", tmp_path / f"{metric}.json", *FAST) == 0
        headline, header = capsys.readouterr().out.splitlines()[:2]
        assert f"ranked by {name}" in headline and f"(--rank-metric {metric})" in headline
        columns = header.split()
        # the metric that ranked comes first among the metric columns
        assert (columns.index("KL") < columns.index("ppl")) == (metric == "kl")


def test_help_for_every_command(capsys):
    out = subprocess.run([sys.executable, "-m", "cqil_kernels", "--help"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "usage: python -m cqil_kernels" in out.stdout and "analyze" in out.stdout
    for cmd in ("analyze", "search", "eval", "generate", "main", "distill", "tune"):
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0
        assert f"usage: python -m cqil_kernels {cmd}" in capsys.readouterr().out


def test_distill_argument_hooks():
    import argparse

    from cqil_kernels.cli import add_distill_arguments

    ap = add_distill_arguments(argparse.ArgumentParser(), default_steps=7, lr=2e-3)
    args = ap.parse_args(["--distill-rank", "8"])
    assert args.distill_steps == 7 and args.distill_rank == 8 and args.distill_target == "grouped"
    assert args.distill_lr == 2e-3 and args.distill_max_seconds == 0
