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


def test_help_for_every_command(capsys):
    out = subprocess.run([sys.executable, "-m", "cqil_kernels", "--help"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "usage: python -m cqil_kernels" in out.stdout and "analyze" in out.stdout
    for cmd in ("analyze", "search", "eval", "generate", "main", "distill", "tune"):
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0
        assert f"usage: python -m cqil_kernels {cmd}" in capsys.readouterr().out
