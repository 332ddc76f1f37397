"""``torchrun --nproc-per-node=2 -m cqil_kernels generate|eval`` end to end (gloo on the CPU) against
the one-process run of the same command, and the commands that refuse to run under torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from cqil_kernels.cli import main
from test_loading import save_tiny_model

FAST = ["--seq-len", "24", "--no-progress"]
#: the whole torchrun run (two ranks importing torch + transformers on a busy 2-core machine)
RUN_TIMEOUT_S = 240


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("torchrun")
    save_tiny_model(root / "model", num_layers=7)
    plan = root / "plan.json"
    # a pair split 1 + 1 over the ranks, and a group of 4 split 2 + 2 with the bypass across ranks;
    # layer 0 stays sequential (replicated)
    plan.write_text(json.dumps({"groups": [[1, 2], [3, 4, 5, 6]], "bypass": [0, 1]}))
    text = root / "text.txt"
    text.write_text("It is a truth universally acknowledged, that a single man in possession of a good "
                    "fortune, must be in want of a wife.\n" * 20, encoding="utf-8")
    return root


def _torchrun(*args, timeout=RUN_TIMEOUT_S) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                           "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"  # two ranks on two cores
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "cqil_kernels", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def test_torchrun_generate_gives_the_one_process_tokens(tiny, capsys):
    one = tiny / "one.json"
    assert main(["generate", "--model", str(tiny / "model"), "--plan", str(tiny / "plan.json"), "--prompt",
                 "a single man", "--max-new-tokens", "6", "--no-chat-template", "--no-base", "--out", str(one),
                 *FAST]) == 0
    two = tiny / "two.json"
    r = _torchrun("generate", "--model", tiny / "model", "--plan", tiny / "plan.json", "--prompt", "a single man",
                  "--max-new-tokens", "6", "--no-chat-template", "--out", two, "--dist-timeout", "60", *FAST)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert b["world_size"] == 2 and a["world_size"] == 1
    assert b["outputs"]["cqil"]["token_ids"] == a["outputs"]["cqil"]["token_ids"]
    assert len(b["outputs"]["cqil"]["token_ids"]) == 6
    ranks = {r["rank"]: r for r in b["placement"]["ranks"]}
    # each rank holds its own block of each group, and the replicated layer 0
    assert ranks[0]["group_layers"] == [[1], [3, 4]] and ranks[1]["group_layers"] == [[2], [5, 6]]
    assert b["placement"]["replicated"] == [0]
    assert set(ranks[0]["layers"]) == {0, 1, 3, 4} and set(ranks[1]["layers"]) == {0, 2, 5, 6}
    assert r.stdout.count("--- cqil") == 1  # rank 0 alone prints


def test_torchrun_eval_matches_the_one_process_evaluation(tiny):
    one, two = tiny / "eval1.json", tiny / "eval2.json"
    common = ["--model", tiny / "model", "--plan", tiny / "plan.json", "--text", tiny / "text.txt",
              "--max-windows", "2", *FAST]
    assert main(["eval", *map(str, common), "--out", str(one)]) == 0
    r = _torchrun("eval", *common, "--out", two, "--dist-timeout", "60")
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert b["world_size"] == 2
    assert b["base"]["perplexity"] == pytest.approx(a["base"]["perplexity"], rel=1e-6)
    # the split groups sum their deltas in another order than one process: float32 rounding only
    assert b["converted"]["perplexity"] == pytest.approx(a["converted"]["perplexity"], rel=1e-5)
    assert b["converted"]["kl"] == pytest.approx(a["converted"]["kl"], rel=1e-3, abs=1e-7)


@pytest.mark.parametrize("command", ["search", "main", "analyze"])
def test_single_process_commands_refuse_torchrun(command, monkeypatch, capsys):
    for k, v in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": "29999"}.items():
        monkeypatch.setenv(k, v)
    argv = [command, "--groups", "1"] if command != "analyze" else [command]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "runs in one process" in err and "generate, eval, bench" in err


def test_half_set_launcher_environment_is_one_clear_error(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    assert main(["generate", "--max-new-tokens", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "incomplete launcher environment" in err


def test_bench_one_process_and_torchrun(tiny):
    """bench times the model without groups (one device) and the plan; under torchrun the plan is
    split over the ranks and rank 0 writes the JSON. Times are checked for presence, not speed."""
    opts = ["--model", tiny / "model", "--plan", tiny / "plan.json", "--context-lengths", "12", "--prompt-len", "6",
            "--decode-steps", "2", "--repeats", "2", "--no-progress"]
    one, two = tiny / "bench1.json", tiny / "bench2.json"
    assert main(["bench", *map(str, opts), "--out", str(one)]) == 0
    r = _torchrun("bench", *opts, "--out", two, "--dist-timeout", "60")
    assert r.returncode == 0, r.stderr[-3000:]
    for path, world in ((one, 1), (two, 2)):
        d = json.loads(path.read_text())
        assert d["world_size"] == world and set(d["results"]) == {"no groups", "plan"}
        for res in d["results"].values():
            assert set(res["decode"]) == {"B1 ctx12"} and set(res["prefill"]) == {"B1 T6"}
            st = res["decode"]["B1 ctx12"]
            assert st["repeats"] == 2 and len(st["all_ms"]) == 2 and st["min_ms"] <= st["median_ms"] <= st["max_ms"]
    assert json.loads(two.read_text())["placement"]["ranks"][1]["group_layers"] == [[2], [5, 6]]
    assert r.stdout.count("speed-up") == 1  # rank 0 alone prints


def test_bench_errors_are_one_line(tiny, capsys):
    with pytest.raises(SystemExit) as e:  # a parser error
        main(["bench", "--model", str(tiny / "model"), "--batch-sizes", "0"])
    assert e.value.code == 2
    assert main(["bench", "--model", str(tiny / "model"), "--plan", "/no/such/plan.json"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "--batch-sizes" in err[0] and "plan file not found" in err[1]
