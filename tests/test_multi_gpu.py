"""Two GPUs (issue 7): a model split by accelerate's device_map, and tensor parallelism over NCCL.

Skipped, with the reason, where fewer than two CUDA devices are visible. The split model runs bf16
with the kernel: first-step logits by relative error, greedy tokens by agreement rate (bf16 can flip
a near-tie). Tensor parallelism runs fp32 and must give the one-GPU tokens exactly.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mla_patch
from conftest import build_model, free_port, left_padded_prompt, rel_err, tiny_config

pytestmark = pytest.mark.cuda
needs_two = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="fewer than two CUDA devices visible")


def _model(dtype=torch.bfloat16):
    config = tiny_config("deepseek_v2", hidden_size=256, num_attention_heads=16, kv_lora_rank=512, qk_rope_head_dim=64,
                         qk_nope_head_dim=64, v_head_dim=64, num_hidden_layers=4, first_k_dense_replace=4, vocab_size=512)
    return build_model(config, dtype=torch.float32).to(dtype)


@needs_two
def test_device_map_split_equals_one_gpu():
    from accelerate import dispatch_model

    base = _model()
    one = copy.deepcopy(base).to("cuda:0")
    mla_patch.patch(one)
    device_map = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers.0": 0, "model.layers.1": 0,
                  "model.layers.2": 1, "model.layers.3": 1, "model.norm": 1, "lm_head": 1}
    split = dispatch_model(copy.deepcopy(base), device_map=device_map)
    mla_patch.patch(split)
    ids, mask = left_padded_prompt(11, batch=3, length=24, pad=(0, 5, 9))
    kwargs = dict(max_new_tokens=24, do_sample=False, output_logits=True, return_dict_in_generate=True)
    want = one.generate(input_ids=ids.cuda(0), attention_mask=mask.cuda(0), **kwargs)
    got = split.generate(input_ids=ids.cuda(0), attention_mask=mask.cuda(0), **kwargs)
    cache = got["cache"] if "cache" in got.keys() else got["past_key_values"]
    # Each layer's latent cache lives on its layer's GPU.
    assert [layer.buffer.device.index for layer in cache.layers] == [0, 0, 1, 1]
    assert rel_err(got.logits[0].float().cpu(), want.logits[0].float().cpu()) < 1e-3
    agree = (got.sequences.cpu() == want.sequences.cpu()).float().mean().item()
    assert agree > 0.95, f"greedy tokens agree on {agree:.1%}"


@needs_two
def test_tensor_parallel_over_nccl_equals_one_gpu(tmp_path):
    from transformers import DeepseekV2Config

    if "layers.*.self_attn.kv_b_proj" not in (getattr(DeepseekV2Config, "base_model_tp_plan", None) or {}):
        pytest.skip("this transformers has no attention TP plan for DeepSeek-V2")
    base = _model(torch.float32)
    base.save_pretrained(tmp_path / "model")
    out = tmp_path / "rank0.pt"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path.cwd()), os.environ.get("PYTHONPATH", "")]))
    worker = Path(__file__).with_name("tp_worker.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(worker), str(tmp_path / "model"), str(out), "patch", "cuda"]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    got = torch.load(out)
    ids = torch.tensor([[5, 9, 12, 40, 7, 3, 22, 18, 31, 44], [0, 0, 0, 8, 17, 23, 4, 61, 70, 2]])
    want = base.cuda().generate(input_ids=ids.cuda(), attention_mask=(ids != 0).long().cuda(), max_new_tokens=12,
                                do_sample=False, output_logits=True, return_dict_in_generate=True)
    assert got["local_heads"] == 8
    assert torch.equal(got["sequences"].cpu(), want.sequences.cpu())
    assert rel_err(got["logits"].cpu(), torch.stack(want.logits).cpu()) < 1e-4
