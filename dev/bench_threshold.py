"""Where does absorbed decode stop paying? One MLA layer, S new tokens on a T-token latent cache.

    python dev/bench_threshold.py [--device cuda] [--heads 128] [--context 4096] [--batch 8]

For each S it times the patched layer forced down the absorbed path and forced down the stock
(expand the latent cache through kv_b_proj, then attention) path, on the same cache, and prints
the ratio. `attention.DECODE_MAX_NEW_TOKENS` is chosen below the crossover. Random weights:
the shapes are DeepSeek-V2/V3's (benchmarks/models.py's v3-128h: q_lora 1536, kv_lora 512, rope 64, nope 128,
v 128), hidden 7168 at 128 heads, else 2048.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
from transformers.models.deepseek_v3.modeling_deepseek_v3 import (
    DeepseekV3Attention,
    DeepseekV3RotaryEmbedding,
)

if __name__ == "__main__":  # run as a file, sys.path[0] is this folder: import from the repo root instead
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
import mla_patch
from benchmarks.models import model_config
from benchmarks.timing import wall_s
from mla_patch import CACHE_KWARG, attention


def time_both_paths(layer, rope, config, batch, context, new_tokens, repeats, device, dtype) -> dict:
    """Seconds of one layer call, `new_tokens` tokens a sequence on `context` cached rows, down each path."""
    cache = mla_patch.LatentCache(initial_capacity=context + new_tokens + 8)
    cache.update(torch.randn(batch, 1, context, config.kv_lora_rank, device=device, dtype=dtype),
                 torch.randn(batch, 1, context, config.qk_rope_head_dim, device=device, dtype=dtype), 0)
    x = torch.randn(batch, new_tokens, config.hidden_size, device=device, dtype=dtype)
    positions = torch.arange(context, context + new_tokens, device=device)[None].expand(batch, new_tokens)
    pos_emb = rope(x, positions)

    def step():
        layer(hidden_states=x, position_embeddings=pos_emb, attention_mask=None, **{CACHE_KWARG: cache})
        cache.crop(-new_tokens)  # every repeat sees the same cached rows

    timings = {}
    for path, limit in (("absorbed", 10**9), ("stock", 0)):
        attention.DECODE_MAX_NEW_TOKENS = limit
        with torch.no_grad():
            timings[path] = wall_s(step, repeats)
    return timings


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
    hidden = 7168 if args.heads == 128 else 2048
    config = model_config("v3-128h", num_attention_heads=args.heads, hidden_size=hidden)
    torch.manual_seed(0)
    layer = DeepseekV3Attention(config, layer_idx=0).to(device=device, dtype=dtype).eval()
    rope = DeepseekV3RotaryEmbedding(config).to(device)
    mla_patch.patch(layer)
    B, T = args.batch, args.context
    rows = []
    for S in (int(s) for s in args.new_tokens.split(",")):
        timings = time_both_paths(layer, rope, config, B, T, S, args.repeats, device, dtype)
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
