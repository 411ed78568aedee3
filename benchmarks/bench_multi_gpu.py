"""Issue 7: a DeepSeek-V2-Lite-shaped model split over two GPUs by accelerate's device_map.

    python benchmarks/bench_multi_gpu.py --out out/ [--gpus 2] [--batch 16] [--context 4096]

Random bf16 weights (real shapes), materialized directly on each layer's GPU from the meta device,
layers split evenly. It compares patched and stock greedy output on the split model, records where
each layer's latent cache lives, and times decode steps (stock vs patched through plain generate(), the
cache holding L - 1 random latent rows: bench_generate's method, --steps new tokens against 1), writing
bench_multi_gpu.json. The equality with one GPU is tests/test_multi_gpu.py's job. `--smoke` runs tiny shapes
with every layer on the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

if __name__ == "__main__":  # run as a file, sys.path[0] is this folder: import from the repo root instead
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
import mla_patch
from benchmarks import bench_generate
from benchmarks.models import MODELS, fill_random_, model_config, shrink

# Each variant as bench_generate runs it: "patched-graphs" is plain generate() after patch(), which runs
# eagerly on a model spread over several devices.
RUN_AS = {"stock": "stock", "patched": "patched-graphs"}


def build_split(name: str, gpus: int, smoke: bool):
    """The model on the meta device, then each parameter materialized (random) on its layer's device."""
    from accelerate import dispatch_model, init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    from transformers import AutoModelForCausalLM

    config = model_config(name)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    layers = config.num_hidden_layers
    per_gpu = -(-layers // gpus)
    devices = ["cpu"] * gpus if smoke else list(range(gpus))
    device_map = {"model.embed_tokens": devices[0], "model.rotary_emb": devices[0],
                  "model.norm": devices[-1], "lm_head": devices[-1]}
    device_map.update({f"model.layers.{i}": devices[i // per_gpu] for i in range(layers)})
    gen = torch.Generator().manual_seed(0)
    for pname, param in list(model.named_parameters()):
        owner = next(k for k in sorted(device_map, key=len, reverse=True) if pname.startswith(k + "."))
        value = torch.empty(param.shape, dtype=torch.bfloat16)
        fill_random_(value, gen)
        set_module_tensor_to_device(model, pname, device_map[owner], value=value)
    return dispatch_model(model.eval(), device_map=device_map), device_map


def cache_devices(out) -> list[str]:
    """Where each layer's latent cache lives after a patched generate()."""
    cache = out["cache"] if "cache" in out else out["past_key_values"]  # the field's name varies by version
    return sorted({str(layer.buffer.device) for layer in cache.layers})


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="out")
    parser.add_argument("--model", default="v2-lite", choices=sorted(MODELS))
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=5, help="new tokens of the long generate() call (>= 2)")
    parser.add_argument("--new-tokens", type=int, default=24, help="greedy tokens compared, patched vs stock")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    if args.smoke:
        shrink(q_lora_rank=16, n_routed_experts=4, hidden_size=64, num_hidden_layers=4, intermediate_size=64,
               moe_intermediate_size=32, vocab_size=128, kv_lora_rank=32, qk_rope_head_dim=8,
               qk_nope_head_dim=8, v_head_dim=8, num_attention_heads=4)
        args.batch, args.context, args.steps, args.new_tokens = 2, 32, 2, 6
    elif torch.cuda.device_count() < args.gpus:
        sys.exit(f"needs {args.gpus} CUDA devices, {torch.cuda.device_count()} visible")
    os.makedirs(args.out, exist_ok=True)
    model, device_map = build_split(args.model, args.gpus, args.smoke)
    first = torch.device(device_map["model.embed_tokens"])
    ids = torch.randint(3, min(1000, model.config.vocab_size), (args.batch, 32), device=first)
    latents = bench_generate.random_latents(model, args.batch, args.context - 1)

    result = {"model": args.model, "gpus": args.gpus, "device_map": {k: str(v) for k, v in device_map.items()},
              "batch": args.batch, "context": args.context, "note": "random bf16 weights; real shapes"}
    greedy = {}
    for variant, run_as in RUN_AS.items():
        mla_patch.unpatch(model)
        if variant == "patched":
            mla_patch.patch(model)
        out = model.generate(input_ids=ids, max_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0,
                             return_dict_in_generate=True)
        greedy[variant] = out.sequences.cpu()
        if variant == "patched":  # each layer's latent on its own layer's device
            result["cache_devices"] = cache_devices(out)
        del out
        row, _, _ = bench_generate.run_point(model, args.model, run_as, args.batch, args.context, args.steps,
                                             latents)
        ms = row["ms_per_step"]
        result[f"{variant}_ms_per_step"] = ms
        result[f"{variant}_tokens_per_s"] = args.batch * 1e3 / ms
        print(f"{variant:8s} {ms:8.2f} ms/step  {args.batch * 1e3 / ms:9.1f} tok/s", flush=True)
    agree = (greedy["stock"] == greedy["patched"]).float().mean().item()
    result["greedy_agreement_patched_vs_stock"] = agree
    result["speedup"] = result["stock_ms_per_step"] / result["patched_ms_per_step"]
    print(f"greedy agreement patched vs stock on the split model: {agree:.1%}; speed-up {result['speedup']:.2f}x")
    print("latent cache devices:", result["cache_devices"])
    with open(os.path.join(args.out, "bench_multi_gpu.json"), "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
