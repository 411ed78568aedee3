"""Where does absorbed decode stop paying? One MLA layer, S new tokens on a T-token latent cache.

    python scripts/bench_threshold.py [--device cuda] [--heads 128] [--context 4096] [--batch 8]

For each S it times the patched layer forced down the absorbed path and forced down the stock
(expand the latent cache through kv_b_proj, then attention) path, on the same cache, and prints
the ratio. `attention.DECODE_MAX_NEW_TOKENS` is chosen below the crossover. Random weights:
the shapes are DeepSeek-V2/V3's (q_lora 1536, kv_lora 512, rope 64, nope 128, v 128).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from transformers import DeepseekV3Config
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention, DeepseekV3RotaryEmbedding

import mla_patch
from mla_patch import CACHE_KWARG
from mla_patch import attention


def _time(fn, device, repeats):
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--heads", type=int, default=128)
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", default="1,2,4,8,16,32,64,128")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = DeepseekV3Config(hidden_size=7168 if args.heads == 128 else 2048, num_attention_heads=args.heads,
                              num_key_value_heads=args.heads, q_lora_rank=1536, kv_lora_rank=512,
                              qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128, rope_interleave=True)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    layer = DeepseekV3Attention(config, layer_idx=0).to(device=device, dtype=dtype).eval()
    rope = DeepseekV3RotaryEmbedding(config).to(device)
    mla_patch.patch(layer)
    B, T = args.batch, args.context
    rows = []
    for S in (int(s) for s in args.new_tokens.split(",")):
        cache = mla_patch.LatentCache(initial_capacity=T + S + 8)
        cache.update(torch.randn(B, 1, T, 512, device=device, dtype=dtype),
                     torch.randn(B, 1, T, 64, device=device, dtype=dtype), 0)
        x = torch.randn(B, S, config.hidden_size, device=device, dtype=dtype)
        positions = torch.arange(T, T + S, device=device)[None].expand(B, S)
        pos_emb = rope(x, positions)

        def step():
            layer(hidden_states=x, position_embeddings=pos_emb, attention_mask=None, **{CACHE_KWARG: cache})
            cache.crop(-S)  # every repeat sees the same T cached tokens

        timings = {}
        for path, limit in (("absorbed", 10**9), ("stock", 0)):
            attention.DECODE_MAX_NEW_TOKENS = limit
            with torch.no_grad():
                timings[path] = _time(step, device, args.repeats)
        rows.append(dict(new_tokens=S, absorbed_ms=timings["absorbed"] * 1e3, stock_ms=timings["stock"] * 1e3,
                         stock_over_absorbed=timings["stock"] / timings["absorbed"]))
        print(f"S={S:4d}  absorbed {rows[-1]['absorbed_ms']:9.3f} ms  stock {rows[-1]['stock_ms']:9.3f} ms  "
              f"stock/absorbed {rows[-1]['stock_over_absorbed']:6.2f}x", flush=True)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"device {name}, heads {args.heads}, batch {B}, context {T}, dtype {dtype}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=name, heads=args.heads, batch=B, context=T, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
