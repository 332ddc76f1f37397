"""Which layers are quasi-independent: input similarity of layers, measured cost of each group.

Two views of the same question, on calibration text:

- ``similarity[i][j]``: cosine similarity of the hidden states entering layers ``i`` and ``j``
  (per token, averaged over tokens). CQIL feeds layer ``j`` of a group the input of its first
  layer instead of its own, so high similarity of adjacent inputs is the paper's motivation.
- ``costs``: what converting one group of ``parallel`` adjacent layers (and nothing else) actually
  does: perplexity change and KL(base || converted), measured by converting in place.

Similarity is a weak predictor of cost (design.md section 1): a plan search ranks by the measured
costs, and the similarity matrix is there to look at.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import torch

from .conversion import decoder_layers
from .evaluate import compare_plans
from .plan import CQILPlan

__all__ = ["GroupCost", "LayerAnalysis", "analyze", "candidate_groups", "resolve_layers"]

METRICS = ("kl", "ppl")


@dataclass(frozen=True)
class GroupCost:
    """Measured effect of converting one group alone (calibration text, vs the sequential model)."""

    group: tuple[int, ...]
    perplexity: float
    ppl_increase: float  # relative, 0.05 = +5%
    kl: float  # mean KL(base || converted), nats per token
    top1_agreement: float

    def metric(self, name: str) -> float:
        if name == "kl":
            return self.kl
        if name == "ppl":
            return self.ppl_increase
        raise ValueError(f"unknown metric {name!r}; use one of {METRICS}")

    def to_dict(self) -> dict:
        return {
            "group": list(self.group),
            "perplexity": self.perplexity,
            "ppl_increase": self.ppl_increase,
            "kl": self.kl,
            "top1_agreement": self.top1_agreement,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "GroupCost":
        return cls(
            tuple(d["group"]), float(d["perplexity"]), float(d["ppl_increase"]), float(d["kl"]),
            float(d["top1_agreement"]),
        )


@dataclass
class LayerAnalysis:
    """Result of ``analyze``.

    Attributes:
        num_layers: L.
        parallel: group size P of the measured candidates.
        bypass: bypass distance the candidates were measured with.
        similarity: [L][L] cosine similarity of layer inputs (symmetric, unit diagonal).
        base_perplexity: the sequential model's perplexity on the calibration windows.
        costs: one GroupCost per candidate group (layers in ``exclude`` are never candidates);
            empty when costs were not measured.
        exclude: layers no candidate touches.
        text: description of the calibration windows.
        seconds: wall time of the analysis.
    """

    num_layers: int
    parallel: int
    bypass: int
    similarity: list
    base_perplexity: float
    costs: list = field(default_factory=list)
    exclude: list = field(default_factory=list)
    text: dict = field(default_factory=dict)
    seconds: float = 0.0

    def adjacent_similarity(self) -> list[float]:
        """[L-1]: similarity of the inputs of layers i and i+1."""
        return [self.similarity[i][i + 1] for i in range(self.num_layers - 1)]

    def cost_of(self, group) -> GroupCost:
        group = tuple(group)
        for c in self.costs:
            if c.group == group:
                return c
        raise KeyError(f"group {list(group)} was not measured")

    def ranked(self, metric: str = "kl") -> list[GroupCost]:
        """Candidates, cheapest first (ties by position)."""
        return sorted(self.costs, key=lambda c: (c.metric(metric), c.group))

    def to_dict(self) -> dict:
        return {
            "num_layers": self.num_layers,
            "parallel": self.parallel,
            "bypass": self.bypass,
            "base_perplexity": self.base_perplexity,
            "exclude": list(self.exclude),
            "text": self.text,
            "seconds": self.seconds,
            "similarity": self.similarity,
            "adjacent_similarity": self.adjacent_similarity(),
            "costs": [c.to_dict() for c in self.costs],
        }

    def to_json(self, path=None, indent: int | None = 1) -> str:
        """JSON of ``to_dict()``; also written to ``path`` when given."""
        from .report import json_text

        return json_text(self.to_dict(), path, indent)

    @classmethod
    def from_dict(cls, d: dict) -> "LayerAnalysis":
        return cls(
            num_layers=int(d["num_layers"]),
            parallel=int(d["parallel"]),
            bypass=int(d.get("bypass", 0)),
            similarity=[list(map(float, row)) for row in d["similarity"]],
            base_perplexity=float(d["base_perplexity"]),
            costs=[GroupCost.from_dict(c) for c in d.get("costs", [])],
            exclude=list(d.get("exclude", [])),
            text=dict(d.get("text", {})),
            seconds=float(d.get("seconds", 0.0)),
        )

    @classmethod
    def from_json(cls, text_or_path) -> "LayerAnalysis":
        """Parse ``to_json`` output from a string or a file path."""
        text = str(text_or_path)
        if not text.lstrip().startswith("{"):
            with open(text, encoding="utf-8") as f:
                text = f.read()
        return cls.from_dict(json.loads(text))

    def plot(self, path, plan: CQILPlan | None = None) -> None:
        """Write a PNG: similarity heatmap (adjacent pairs outlined) and per-group cost bars; the
        groups of ``plan`` (e.g. the one a search chose) are marked in both."""
        from .report import plot_analysis

        plot_analysis(self, path, plan=plan)


def resolve_layers(layers, num_layers: int, what: str = "layer") -> list[int]:
    """Layer indices in ``[-L, L)`` (negative: from the last layer) -> sorted unique ``[0, L)``.

    Raises TypeError for a non-integer and ValueError for an index out of range, naming ``what``.
    """
    if isinstance(layers, (str, bytes)) or not hasattr(layers, "__iter__"):
        raise TypeError(f"{what} must be a list of layer indices, got {layers!r}")
    out = set()
    for v in layers:
        if isinstance(v, bool) or not isinstance(v, int):
            try:
                import numpy as np

                if isinstance(v, np.integer):
                    v = int(v)
            except ImportError:  # pragma: no cover
                pass
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{what} must hold layer indices (ints), got {v!r}")
        if not -num_layers <= v < num_layers:
            raise ValueError(f"{what}: layer {v} is out of range for a model with {num_layers} layers")
        out.add(v % num_layers)
    return sorted(out)


def candidate_groups(num_layers: int, parallel: int, exclude=()) -> list[tuple[int, ...]]:
    """All runs of ``parallel`` adjacent layers that touch no layer in ``exclude``."""
    if parallel < 2:
        raise ValueError(f"parallel must be >= 2, got {parallel}")
    if parallel > num_layers:
        raise ValueError(f"parallel={parallel} exceeds the model's {num_layers} layers")
    excluded = set(int(e) for e in exclude)
    out = []
    for start in range(num_layers - parallel + 1):
        group = tuple(range(start, start + parallel))
        if not excluded.intersection(group):
            out.append(group)
    return out


class _SimilarityAccumulator:
    """Sum over tokens of cos(h_i, h_j) for all layer pairs."""

    def __init__(self, num_layers: int):
        self.sum = torch.zeros(num_layers, num_layers, dtype=torch.float64)
        self.count = 0

    def __call__(self, inputs: list, mask: torch.Tensor) -> None:
        # inputs: L x [b, T, H]; hidden state at position q predicts token q+1, so the score mask
        # ([b, T-1], aligned with positions 0..T-2) picks each text position exactly once.
        vecs = torch.stack([x[:, :-1][mask].float() for x in inputs])  # [L, n, H]
        vecs = torch.nn.functional.normalize(vecs, dim=-1)
        self.sum += torch.einsum("ind,jnd->ij", vecs, vecs).double()
        self.count += vecs.shape[1]

    def matrix(self) -> torch.Tensor:
        sim = self.sum / max(self.count, 1)
        sim = 0.5 * (sim + sim.T)  # exact symmetry despite summation order
        sim.fill_diagonal_(1.0)
        return sim


def analyze(
    model,
    windows,
    parallel: int = 2,
    *,
    bypass: int = 0,
    exclude=(),
    measure_costs: bool = True,
    batch_size: int = 2,
    progress: bool = True,
    backend: str = "auto",
) -> LayerAnalysis:
    """Layer-input similarity and the measured cost of every candidate group of ``parallel`` layers.

    Args:
        model: a HF causal LM (converted or not; analysed as its sequential original, state restored).
        windows: calibration ``TokenWindows`` [W, T].
        parallel: group size P; candidates are the L-P+1 runs of P adjacent layers.
        bypass: bypass distance d used when measuring each candidate, ``0 <= d < parallel``.
        exclude: layers no candidate may touch (their candidates are not measured); indices in
            ``[-L, L)``, negative ones counted from the last layer.
        measure_costs: False computes only the similarity (one forward per batch).

    Raises:
        TypeError / ValueError: a bad argument, checked before the model is touched (the model
        is restored to its own plan and backend after the measurement, also after an error).

    Returns:
        LayerAnalysis with ``similarity`` [L][L] and ``costs`` (one per candidate).

    Example:
        >>> a = analyze(model, load_windows(tok, split="calib", max_windows=4))  # doctest: +SKIP
        >>> a.ranked("kl")[0].group                                             # doctest: +SKIP
        (22, 23)
    """
    t0 = time.perf_counter()
    num_layers = len(decoder_layers(model))
    exclude = resolve_layers(exclude, num_layers, "exclude")
    if isinstance(parallel, bool) or not isinstance(parallel, int):
        raise TypeError(f"parallel must be an int, got {parallel!r}")
    if isinstance(bypass, bool) or not isinstance(bypass, int) or not 0 <= bypass < max(parallel, 1):
        raise ValueError(f"bypass must be an int in [0, parallel-1={parallel - 1}], got {bypass!r}")
    if not isinstance(measure_costs, bool):
        raise TypeError(f"measure_costs must be True or False, got {measure_costs!r}")
    candidates = candidate_groups(num_layers, parallel, exclude)  # checks parallel
    groups = candidates if measure_costs else []
    plans = [CQILPlan([list(g)], bypass=bypass) for g in groups]
    sim = _SimilarityAccumulator(num_layers)
    base, results = compare_plans(
        model, windows, plans, batch_size=batch_size, progress=progress, backend=backend,
        on_layer_inputs=sim, desc=f"analysing {len(plans)} groups",
    )
    costs = [
        GroupCost(g, r.perplexity, r.ppl_increase, r.kl, r.top1_agreement) for g, r in zip(groups, results)
    ]
    return LayerAnalysis(
        num_layers=num_layers,
        parallel=parallel,
        bypass=bypass,
        similarity=sim.matrix().tolist(),
        base_perplexity=base.perplexity,
        costs=costs,
        exclude=exclude,
        text=windows.to_dict(),
        seconds=time.perf_counter() - t0,
    )
