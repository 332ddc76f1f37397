"""Human-readable output: text tables, JSON files and PNG figures.

matplotlib is imported inside the plotting functions and used through its object API
(``Figure`` + the Agg canvas), never ``pyplot``: no global backend switch, no GUI, and
``import cqil_kernels`` stays free of it.
"""

from __future__ import annotations

import json
import math
import os
import platform
from pathlib import Path

__all__ = ["format_table", "write_json", "plot_analysis", "environment", "fmt"]


def fmt(value, digits: int = 4) -> str:
    """Compact number formatting for tables; ``-`` for None."""
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.{digits}g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


def format_table(header: list[str], rows: list[list]) -> str:
    """Monospace table: ``header`` and ``rows`` of values (formatted with ``fmt``)."""
    cells = [list(header)] + [[v if isinstance(v, str) else fmt(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def json_text(data, path=None, indent: int | None = 1) -> str:
    """``data`` as JSON text; also written to ``path`` (its folder created) when given."""
    text = json.dumps(data, indent=indent)
    if path is not None:
        path = Path(os.fspath(path))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n", encoding="utf-8")
    return text


def write_json(data, path) -> Path:
    """Write ``data`` as indented JSON, creating the parent folder."""
    path = Path(os.fspath(path))
    if path.parent and not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    return path


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_revision() -> str:
    """HEAD of the checkout this package runs from ("-dirty" with uncommitted changes), or "unknown"."""
    import subprocess

    here = os.path.dirname(os.path.abspath(__file__))
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (rev or "unknown") + ("-dirty" if rev and dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment(device=None) -> dict:
    """Device, versions, git revision and time, recorded next to every measurement.

    ``device``: where the measurement ran ("cpu", "cuda", "cuda:1"); None = CUDA device 0 when
    there is one, else the CPU. Numbers without the card and versions cannot be compared.
    """
    import datetime as _dt

    import torch

    info = {
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git_revision": git_revision(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": _cpu_name(),
        "cpu_threads": torch.get_num_threads(),
    }
    for mod in ("triton", "transformers"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:
            info[mod] = None
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if str(device).startswith("cuda"):
        info["device"] = torch.cuda.get_device_name(torch.device(device))
        info["cuda"] = torch.version.cuda
    else:
        info["device"] = f"CPU: {info['cpu']}"
    return info


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def plot_analysis(analysis, path, plan=None) -> Path:
    """PNG of a LayerAnalysis: input-similarity heatmap and the measured cost of each group.

    Left: ``similarity`` [L, L] with the adjacent pairs (i, i+1) outlined. Right: KL and relative
    perplexity change of converting each candidate group alone (log scale: costs span decades).
    ``plan`` (a CQILPlan, optional): its groups are outlined in white on the heatmap and their bars
    drawn in red, with the plan named in the title.
    """
    from matplotlib.patches import Patch, Rectangle

    path = Path(os.fspath(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    n = analysis.num_layers
    chosen = {tuple(g) for g in plan.groups if len(g) > 1} if plan is not None else set()
    fig = _figure(13, 5.2)
    ax = fig.add_subplot(1, 2, 1)
    im = ax.imshow(analysis.similarity, cmap="viridis", vmin=min(0.0, min(map(min, analysis.similarity))), vmax=1.0)
    for i in range(n - 1):
        for (r, c) in ((i, i + 1), (i + 1, i)):
            ax.add_patch(Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=0.8))
    for g in sorted(chosen):
        # the block of the group's layers, i.e. every pair inside it
        ax.add_patch(Rectangle((g[0] - 0.5, g[0] - 0.5), len(g), len(g), fill=False, edgecolor="white", linewidth=2.0))
    title = "cosine similarity of layer inputs (red: adjacent"
    ax.set_title(title + (", white: the plan's groups)" if chosen else ")"))
    ax.set_xlabel("layer")
    ax.set_ylabel("layer")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)

    if analysis.costs:
        labels = ["-".join(map(str, c.group)) for c in analysis.costs]
        x = list(range(len(labels)))
        in_plan = [tuple(c.group) in chosen for c in analysis.costs]
        ax = fig.add_subplot(2, 2, 2)
        ax.bar(x, [max(c.kl, 1e-6) for c in analysis.costs],
               color=["tab:red" if m else "tab:blue" for m in in_plan])
        ax.set_yscale("log")  # costs span decades: the first and last layers are catastrophic
        ax.set_ylabel("KL (nats/token)")
        groups = " ".join("-".join(map(str, (g[0], g[-1]))) for g in sorted(chosen))
        ax.set_title(f"cost of converting one group of {analysis.parallel} alone (calibration text)"
                     + (f"\nred: the plan's groups {groups}" if chosen else ""))
        if chosen:
            ax.legend(handles=[Patch(color="tab:red", label="in the plan")], loc="upper center", fontsize=7)
        ax.set_xticks(x)
        ax.set_xticklabels([])
        ax = fig.add_subplot(2, 2, 4)
        ax.bar(x, [c.ppl_increase * 100 for c in analysis.costs], color=["tab:red" if m else "tab:orange" for m in in_plan])
        ax.set_yscale("symlog", linthresh=1.0)
        ax.axhline(0.0, color="black", linewidth=0.5)
        ax.set_ylabel("perplexity change (%)")
        ax.set_xticks(x)
        ax.set_xticklabels(labels, rotation=90, fontsize=7)
        for tick, m in zip(ax.get_xticklabels(), in_plan):
            if m:
                tick.set_color("tab:red")
                tick.set_fontweight("bold")
        ax.set_xlabel("group")
    else:
        ax = fig.add_subplot(1, 2, 2)
        adj = analysis.adjacent_similarity()
        ax.plot(range(len(adj)), adj, marker="o")
        for g in sorted(chosen):
            ax.axvspan(g[0] - 0.4, g[-1] - 0.6, color="tab:red", alpha=0.2)  # pairs g[0] .. g[-1]-1
        ax.set_title("similarity of adjacent layer inputs (costs not measured)"
                     + ("; red: the plan's groups" if chosen else ""))
        ax.set_xlabel("layer i (pair i, i+1)")
    fig.tight_layout()
    fig.savefig(path)
    return path
