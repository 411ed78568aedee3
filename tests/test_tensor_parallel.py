"""transformers' tensor parallelism (tp_plan="auto"), patched, on two CPU processes over gloo.

Each rank holds its slice of the heads (q / q_b, kv_b and o projections are sharded; kv_a_proj_with_mqa's
"mla_kv_a_proj" plan keeps the latent whole, so the latent cache is whole on every rank) and runs the absorbed
decode on its local heads. The result must equal one unsharded process.

One case per family of `mla_patch.families.FAMILIES`, run where the installed transformers gives that family an
attention TP plan (its `base_model_tp_plan` shards `self_attn...kv_b_proj`); the others skip with the reason. On
transformers 5.25: deepseek_v2, deepseek_v3, glm4_moe_lite, axk1, minicpm3 and longcat_flash (whose two attention
sublayers per decoder layer sit in a list, `layers.*.self_attn.*`). On 5.17: deepseek_v2, glm4_moe_lite,
minicpm3 and longcat_flash (DeepSeek-V3's and A.X K1's plans shard only the MLPs there).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import build_model, free_port, rel_err
from test_families import tiny_family_config

from mla_patch.families import FAMILIES

WORKER = Path(__file__).with_name("tp_worker.py")
RANKS = 2
PROMPT = torch.tensor([[5, 9, 12, 40, 7, 3, 22, 18, 31, 44], [0, 0, 0, 8, 17, 23, 4, 61, 70, 2]])  # as in tp_worker
NEW_TOKENS = 12  # as in tp_worker


def _attention_plan_missing(model_type: str) -> str | None:
    """None when this transformers shards the family's attention by its TP plan; else why the case skips."""
    if FAMILIES[model_type].load() is None:
        return f"this transformers has no {model_type}"
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    plan = getattr(CONFIG_MAPPING[model_type], "base_model_tp_plan", None) or {}
    if not any(key.startswith("layers.*.self_attn.") and key.endswith(".kv_b_proj") for key in plan):
        return f"this transformers has no attention TP plan for {model_type} (kv_b_proj is not sharded)"
    return None


def _tiny_config(model_type: str):
    """test_families' tiny config of the family: two attention layers (LongCat: one decoder layer of two attention
    sublayers), 4 heads, vocab divisible by the ranks (transformers 5.17 shards lm_head)."""
    config = tiny_family_config(model_type, vocab_size=48 * RANKS)
    if model_type == "deepseek_v2":
        config.q_lora_rank = None  # q_proj's colwise plan here; every other case shards q_b_proj
    if model_type == "minicpm3":
        # Tied embeddings times scale_emb = 12 make the random model repeat its last prompt token (row 2: eos at
        # once); untied, it writes varied tokens.
        config.tie_word_embeddings = False
    return config


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_patched_tensor_parallel_equals_one_process(model_type, tmp_path):
    reason = _attention_plan_missing(model_type)
    if reason:
        pytest.skip(reason)
    config = _tiny_config(model_type)
    assert config.num_attention_heads % RANKS == 0 and config.vocab_size % RANKS == 0
    stock = build_model(config, dtype=torch.float32)
    stock.save_pretrained(tmp_path / "model")
    want = stock.generate(input_ids=PROMPT, attention_mask=(PROMPT != 0).long(), max_new_tokens=NEW_TOKENS,
                          do_sample=False, output_logits=True, return_dict_in_generate=True)
    out = tmp_path / "rank0.pt"
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(Path.cwd()), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(RANKS),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           str(WORKER), str(tmp_path / "model"), str(out), "patch"]
    run = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    got = torch.load(out)
    assert got["class"].startswith("Mla"), got["class"]  # the patched attention class
    assert got["local_heads"] == config.num_attention_heads // RANKS  # kv_b_proj really sharded by heads
    decode_steps = want.sequences.shape[1] - PROMPT.shape[1] - 1  # the first new token comes from prefill
    assert decode_steps > 0
    assert got["stats"]["absorbed_tokens"] == PROMPT.shape[0] * decode_steps
    assert got["stats"]["vanilla_fallbacks"] == 0
    assert torch.equal(got["sequences"], want.sequences)
    assert rel_err(got["logits"], torch.stack(want.logits)) < 1e-4
