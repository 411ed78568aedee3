"""generate(cache_implementation="static") as transformers compiles it: one graph, no break, no recompile.

transformers compiles the decode step itself when the cache is static (on CUDA; here on the CPU through
CompileConfig's all-devices switch). A backend that only counts what dynamo hands it shows how many
graphs the step became: a graph break in our attention makes more than one, and a frame re-specialized
per layer makes more than one compile.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import GenerationConfig
from transformers.generation.configuration_utils import CompileConfig

import mla_patch
from conftest import build_model, case_seed, rel_err, tiny_config


def _counting_compile(graphs: list) -> CompileConfig:
    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    config = CompileConfig(backend=backend, mode=None, fullgraph=False)
    config._compile_all_devices = True  # transformers compiles on CUDA only unless told
    return config


def generate_counting_graphs(model, ids, mask):
    """generate() on a static cache compiled through a counting backend: (output, graph breaks, graphs)."""
    graphs: list = []
    counters = torch._dynamo.utils.counters["graph_break"]
    before = sum(counters.values())
    out = _generate_static(model, ids, mask, _counting_compile(graphs))
    return out, sum(counters.values()) - before, len(graphs)


def _generate_static(model, ids, mask, compile_config, new_tokens=6):
    config = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                              cache_implementation="static", compile_config=compile_config,
                              return_dict_in_generate=True, output_logits=True, pad_token_id=0)
    return model.generate(input_ids=ids, attention_mask=mask, generation_config=config)


@pytest.mark.parametrize("family", ["deepseek_v2", "deepseek_v3"])
def test_static_generate_compiles_to_one_graph(family):
    torch._dynamo.reset()
    config = tiny_config(family, first_k_dense_replace=2)  # dense MLPs: the graph count is about attention
    stock = build_model(config, dtype=torch.float32)
    patched = copy.deepcopy(stock)
    mla_patch.patch(patched, backend="torch")
    g = torch.Generator().manual_seed(case_seed("compile-generate", family))
    ids = torch.randint(3, 97, (2, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding: the ranges come from the mask inside the graph

    out, breaks, graphs = generate_counting_graphs(patched, ids, mask)
    assert breaks == 0, dict(torch._dynamo.utils.counters["graph_break"])
    assert graphs == 1, f"the decode step compiled into {graphs} graphs (a break or a recompile)"
    assert mla_patch.decode_stats()["vanilla_fallbacks"] == 0

    want = _generate_static(stock, ids, mask, _counting_compile([]))
    assert torch.equal(out.sequences, want.sequences)
    assert rel_err(torch.stack(out.logits), torch.stack(want.logits)) < 1e-4
