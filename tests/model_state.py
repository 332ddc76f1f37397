"""What a failed call must leave as it was: a snapshot of a model and the check against it."""

from __future__ import annotations

import torch

import cqil_kernels as ck


def snapshot(model) -> dict:
    """State dict values, module classes, CQIL plan and backend, requires_grad flags, mode."""
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "classes": {n: type(m) for n, m in model.named_modules()},
        "plan": ck.get_plan(model),
        "backend": model.__dict__.get("_cqil_backend"),
        "flags": {n: p.requires_grad for n, p in model.named_parameters()},
        "training": model.training,
    }


def assert_unchanged(model, snap: dict) -> None:
    now = snapshot(model)
    assert now["classes"] == snap["classes"]  # no wrappers left, CQIL layer classes as before
    assert now["plan"] == snap["plan"] and now["backend"] == snap["backend"]
    assert now["flags"] == snap["flags"] and now["training"] == snap["training"]
    assert set(now["state"]) == set(snap["state"])
    for k, v in snap["state"].items():
        assert torch.equal(now["state"][k], v), k
