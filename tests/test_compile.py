"""A converted model's decode step traces as one graph (torch.compile fullgraph=True).

transformers' generate() with a static cache compiles the forward on GPU (mode reduce-overhead,
i.e. CUDA graphs), so the group code and the custom ops must trace without graph breaks. On CPU
the aot_eager backend checks the tracing (Dynamo + AOTAutograd with the ops' fake kernels)
without generating code.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import make_tiny
from transformers import StaticCache

import cqil_kernels as ck


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_decode_step_compiles_fullgraph(backend):
    torch._dynamo.reset()
    model = make_tiny("qwen3", num_layers=4)
    ck.convert(model, ck.CQILPlan([[1, 2]], bypass=1), backend=backend)
    ids = torch.tensor([[3, 5, 7, 9]])

    def run(forward):
        cache = StaticCache(config=model.config, max_cache_len=8)
        logits = []
        with torch.no_grad():
            out = model(input_ids=ids, past_key_values=cache, use_cache=True)
            tok = out.logits[:, -1:].argmax(-1)
            for _ in range(3):
                out = forward(input_ids=tok, past_key_values=cache, use_cache=True)
                logits.append(out.logits)
                tok = out.logits[:, -1:].argmax(-1)
        return torch.cat(logits)

    eager = run(model.forward)
    compiled = run(torch.compile(model.forward, backend="aot_eager", fullgraph=True))
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=0)
