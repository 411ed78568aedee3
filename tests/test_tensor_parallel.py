"""transformers' tensor parallelism (tp_plan="auto"), patched, on two CPU processes over gloo.

Each rank holds its slice of the heads (q, kv_b and o projections are sharded; the latent cache is
whole on every rank) and runs the absorbed decode on its local heads. The result must equal one
unsharded process. DeepSeek-V2 carries an attention TP plan in transformers 5.24; DeepSeek-V3's plan
shards only the MLPs (its attention stays replicated), so V2 is the family that exercises it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mla_patch
from conftest import build_model, rel_err, tiny_config

WORKER = Path(__file__).with_name("tp_worker.py")


def _plan_shards_attention() -> bool:
    from transformers import DeepseekV2Config

    return "layers.*.self_attn.kv_b_proj" in (getattr(DeepseekV2Config, "base_model_tp_plan", None) or {})


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_patched_tensor_parallel_equals_one_process(tmp_path):
    if not _plan_shards_attention():
        pytest.skip("this transformers has no attention TP plan for DeepSeek-V2")
    config = tiny_config("deepseek_v2", num_hidden_layers=2, first_k_dense_replace=2, num_attention_heads=4,
                         vocab_size=96)  # transformers 5.17 shards lm_head: vocab divisible by the ranks
    stock = build_model(config, dtype=torch.float32)
    stock.save_pretrained(tmp_path / "model")
    ids = torch.tensor([[5, 9, 12, 40, 7, 3, 22, 18, 31, 44], [0, 0, 0, 8, 17, 23, 4, 61, 70, 2]])
    want = stock.generate(input_ids=ids, attention_mask=(ids != 0).long(), max_new_tokens=12, do_sample=False,
                          output_logits=True, return_dict_in_generate=True)
    out = tmp_path / "rank0.pt"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(Path.cwd()), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29513",
           str(WORKER), str(tmp_path / "model"), str(out), "patch"]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    got = torch.load(out)
    assert got["class"] == "MlaDeepseekV2Attention" and got["local_heads"] == 2  # 4 heads over 2 ranks
    assert got["stats"]["absorbed_tokens"] == 2 * 11 and got["stats"]["vanilla_fallbacks"] == 0
    assert torch.equal(got["sequences"], want.sequences)
    assert rel_err(got["logits"], torch.stack(want.logits)) < 1e-4
