"""Multi-token prediction: model.generate(..., use_mtp=True) against plain generate(), stock and patched.

    python benchmarks/bench_mtp.py --out out/ [--model v3-128h] [--prompts 1024,8192] [--new-tokens 64]
                                   [--variants stock,patched] [--repeats 3] [--smoke]

The model is a shape of benchmarks/models.py (default v3-128h: DeepSeek-V3's 128-head attention, 4 dense layers) with
RANDOM bf16 weights, plus one MTP layer as DeepSeek-V3 has (a MoE decoder layer with enorm, hnorm, eh_proj and
shared_head.norm). Both are saved to a temporary checkpoint directory, the MTP layer under model.layers.{L}.* in a
shard of its own, so that from_pretrained and MtpModel.from_pretrained (which generate(use_mtp=True) calls on every
call) load them the user's way. Batch 1 (transformers' assisted decoding takes one sequence), greedy.

Per variant (stock: transformers as is; patched: mla_patch.patch() before from_pretrained) and prompt length, modes:
  plain        generate(): patched on CUDA replays its decode steps from CUDA graphs (the default)
  plain-eager  patched only: generate(disable_compile=True), the eager absorbed decode
  mtp          generate(use_mtp=True): each step drafts one token with the MTP layer (over its MtpCache) and verifies
               it with the main model (2 tokens in one forward), keeping 1 + (draft accepted) tokens
Decode ms per token = (t(N new tokens) - t(1 new token)) / (N - 1): it takes out the prefill, generate()'s set-up and,
for mtp, the MTP weights' load (both calls pay it); the mtp difference still holds the MTP layer's own prefill over
the prompt (reported apart as mtp_prefill_ms). An instrumented call (spies on transformers' MTPCandidateGenerator,
synchronized clocks around each draft and verify) counts verify steps, drafted and accepted tokens, and times one
draft and one verify. Random weights draft tokens the main model almost never takes, so the measured acceptance is
about 0 and mtp decodes one token a step: step_ms (a whole draft + verify step, from the timed calls) and
projected_tok_s give the speed at other acceptance rates a: (1 + a) tokens every step_ms (DeepSeek-V3 reports 85-90%
acceptance of its second token). Writes mtp.json under --out and prints a table.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import gc
import json
import os
import sys
import tempfile
import time

import torch

if __name__ == "__main__":  # run as a file, sys.path[0] is this folder: import from the repo root instead
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
import mla_patch
from benchmarks import models
from benchmarks.provenance import commit
from benchmarks.timing import sync, wall_s

MODES = {"stock": ("plain", "mtp"), "patched": ("plain", "plain-eager", "mtp")}
ACCEPTANCE = (0.0, 0.5, 0.7, 0.8, 0.9, 1.0)
MTP_SHARD = "model-mtp.safetensors"


# -- the checkpoint: the main model and one MTP layer, on disk --------------------------------------------------


def save_with_mtp(name: str, path: str, device) -> int:
    """MODELS[name] with random bf16 weights and one MTP layer, saved to `path`; returns the main model's layers."""
    from accelerate import init_empty_weights
    from safetensors import safe_open
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    layers = models.MODELS[name]["num_hidden_layers"]
    first_dense = min(models.MODELS[name].get("first_k_dense_replace", 0), layers)  # layer `layers`: MoE, as MTP's
    config = models.model_config(name, num_hidden_layers=layers + 1, first_k_dense_replace=first_dense,
                                 num_mtp_layers=1)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            models.fill_random_(p, gen)
        for n, b in model.named_buffers():
            b.copy_(buffers[n])
    prefix = f"model.layers.{layers}."
    mtp = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if k.startswith(prefix)}
    hidden = config.hidden_size
    for norm in ("enorm", "hnorm", "shared_head.norm"):
        mtp[f"{prefix}{norm}.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
    eh_proj = torch.empty(hidden, 2 * hidden, dtype=torch.bfloat16, device=device)
    models.fill_random_(eh_proj, gen)
    mtp[prefix + "eh_proj.weight"] = eh_proj.cpu()

    model.model.layers = model.model.layers[:layers]  # the main model: without the MTP layer
    model.config.num_hidden_layers = layers
    model.save_pretrained(path)
    del model
    gc.collect()
    save_file(mtp, os.path.join(path, MTP_SHARD), metadata={"format": "pt"})
    # One index over the main model's shard(s) and the MTP shard (the layout of DeepSeek-V3's checkpoint).
    index_path = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index_path):
        with open(index_path) as f:
            index = json.load(f)
    else:
        os.rename(os.path.join(path, "model.safetensors"), os.path.join(path, "model-main.safetensors"))
        with safe_open(os.path.join(path, "model-main.safetensors"), framework="pt") as f:
            index = {"metadata": {}, "weight_map": dict.fromkeys(f.keys(), "model-main.safetensors")}
    index["weight_map"].update(dict.fromkeys(mtp, MTP_SHARD))
    shards = set(index["weight_map"].values())
    index["metadata"]["total_size"] = sum(os.path.getsize(os.path.join(path, f)) for f in shards)
    with open(index_path, "w") as f:
        json.dump(index, f, indent=1)
    return layers


def load(path: str, layers: int, device, experts: str | None):
    """from_pretrained, as a user does. transformers finds the MTP keys through the model class's
    `_keys_to_ignore_on_load_unexpected`, which for DeepseekV3 names the real checkpoint's layer 61: it names this
    checkpoint's MTP layer here (set on the class before loading, so the main model's load ignores them quietly)."""
    from transformers import AutoModelForCausalLM, DeepseekV3ForCausalLM

    DeepseekV3ForCausalLM._keys_to_ignore_on_load_unexpected = [rf"model\.layers\.{layers}\..*"]
    kwargs = {"experts_implementation": experts} if experts else {}
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map=str(device), **kwargs)
    return model.eval()


# -- one point ----------------------------------------------------------------------------------------------------


def _generate(model, ids, mode, new_tokens):
    kwargs = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False, "pad_token_id": 0}
    if mode == "mtp":
        kwargs["use_mtp"] = True
    if mode == "plain-eager":
        kwargs["disable_compile"] = True
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)


@contextlib.contextmanager
def instrumented(model):
    """Records what one generate(use_mtp=True) does: verify steps with the drafted and accepted tokens
    (MTPCandidateGenerator), and the synchronized host time of each MTP forward (the first is the MTP layer's
    prefill), of each main-model forward (the first is the prefill, then the verify steps) and of the MTP load."""
    from transformers.generation.candidate_generator import MTPCandidateGenerator
    from transformers.modeling_layers import MtpModel

    record = {"steps": [], "draft_s": [], "main_s": [], "load_s": []}
    saved = {(MTPCandidateGenerator, "get_candidates"): MTPCandidateGenerator.get_candidates,
             (MTPCandidateGenerator, "update_candidate_strategy"): MTPCandidateGenerator.update_candidate_strategy,
             (MtpModel, "forward"): MtpModel.forward,
             (MtpModel, "from_pretrained"): MtpModel.__dict__["from_pretrained"]}

    def timed(fn, into):
        @functools.wraps(fn)  # generate() reads the forward's signature (position_ids)
        def call(*args, **kwargs):
            if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                return fn(*args, **kwargs)  # a CUDA graph being recorded: no sync there (MTP steps capture none)
            sync()
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            sync()
            record[into].append(time.perf_counter() - start)
            return out
        return call

    def get_candidates(self, input_ids, *args, **kwargs):
        candidates, logits = saved[MTPCandidateGenerator, "get_candidates"](self, input_ids, *args, **kwargs)
        record["steps"].append([candidates.shape[1] - input_ids.shape[1], None])
        return candidates, logits

    def update(self, input_ids, scores, num_matches):
        record["steps"][-1][1] = int(num_matches)
        return saved[MTPCandidateGenerator, "update_candidate_strategy"](self, input_ids, scores, num_matches)

    MTPCandidateGenerator.get_candidates = get_candidates
    MTPCandidateGenerator.update_candidate_strategy = update
    MtpModel.forward = timed(saved[MtpModel, "forward"], "draft_s")
    MtpModel.from_pretrained = classmethod(timed(saved[MtpModel, "from_pretrained"].__func__, "load_s"))
    model.forward = timed(type(model).forward.__get__(model), "main_s")  # the instance's: generate() calls it
    try:
        yield record
    finally:
        for (owner, attr), value in saved.items():
            setattr(owner, attr, value)
        del model.forward


def _median(values):
    values = sorted(values)
    return values[len(values) // 2] if values else float("nan")


def run_point(model, variant, mode, prompt, new_tokens, repeats):
    ids = torch.randint(3, min(1000, model.config.vocab_size), (1, prompt), device=model.device,
                        generator=torch.Generator(device=model.device).manual_seed(prompt))
    warm_start = time.perf_counter()
    sequences = _generate(model, ids, mode, new_tokens)  # warm-up: first-call set-up, graph capture, kernels
    sync()
    warmup_s = time.perf_counter() - warm_start
    long_s = wall_s(lambda: _generate(model, ids, mode, new_tokens), repeats, warmup=0)
    short_s = wall_s(lambda: _generate(model, ids, mode, 1), repeats, warmup=1)
    ms = (long_s - short_s) / (new_tokens - 1) * 1e3
    row = {"variant": variant, "mode": mode, "prompt": prompt, "new_tokens": new_tokens, "wall_s": long_s,
           "wall_s_1_token": short_s, "decode_ms_per_token": ms, "decode_tok_s": 1e3 / ms, "warmup_s": warmup_s}
    if mode == "mtp":
        mla_patch.reset_decode_stats()
        with instrumented(model) as rec:
            again = _generate(model, ids, mode, new_tokens)
        steps = rec["steps"][1:]  # the first loop iteration is the main model's prefill: nothing drafted
        drafted, accepted = sum(d for d, _ in steps), sum(a for _, a in steps)
        # the timed difference t(N) - t(1) holds the MTP layer's prefill and every draft + verify step
        mtp_prefill_ms = rec["draft_s"][0] * 1e3 if rec["draft_s"] else float("nan")
        step_ms = ((long_s - short_s) * 1e3 - mtp_prefill_ms) / max(len(steps), 1)
        row.update(verify_steps=len(steps), drafted=drafted, accepted=accepted,
                   acceptance=accepted / drafted if drafted else float("nan"),
                   tokens_per_step=(new_tokens - 1) / max(len(steps), 1), step_ms=step_ms,
                   draft_ms=_median(rec["draft_s"][1:]) * 1e3, verify_ms=_median(rec["main_s"][1:]) * 1e3,
                   main_prefill_ms=rec["main_s"][0] * 1e3 if rec["main_s"] else float("nan"),
                   mtp_prefill_ms=mtp_prefill_ms, mtp_load_s=_median(rec["load_s"]),
                   projected_tok_s={str(a): (1 + a) / step_ms * 1e3 for a in ACCEPTANCE},
                   same_tokens_instrumented=bool(torch.equal(again, sequences)))
    if variant == "patched":
        if mode == "mtp":
            row["decode_stats"] = mla_patch.decode_stats()  # of the instrumented call (eager: every call counted)
        row["generate_decode"] = mla_patch.status(model).get("generate_decode")
    return row, sequences.cpu()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="out")
    parser.add_argument("--model", default="v3-128h", choices=sorted(models.MODELS))
    parser.add_argument("--prompts", default="1024,8192", help="prompt lengths (batch 1)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--variants", default="stock,patched")
    parser.add_argument("--repeats", type=int, default=3, help="timed generate() calls per length (median)")
    parser.add_argument("--checkpoint-dir", default=None, help="where the temporary checkpoint goes (default: TMPDIR)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, on the CPU without CUDA: checks the script")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        raise SystemExit("bench_mtp needs a CUDA device (--smoke runs tiny shapes on the CPU)")
    device = torch.device("cuda" if cuda else "cpu")
    experts = None if cuda else "eager"  # transformers' grouped_mm / batched_mm experts want CUDA for bf16
    if args.smoke:
        models.shrink(q_lora_rank=32, n_routed_experts=4, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, intermediate_size=96,
                      moe_intermediate_size=32, vocab_size=97)
        args.prompts, args.new_tokens, args.repeats = "16,64", 8, 1
    variants = args.variants.split(",")
    if any(v not in MODES for v in variants):
        raise SystemExit(f"--variants: any of {sorted(MODES)}")
    os.makedirs(args.out, exist_ok=True)
    import transformers
    from transformers import GenerationConfig

    if not hasattr(GenerationConfig(), "use_mtp"):
        raise SystemExit(f"transformers {transformers.__version__} has no generate(use_mtp=True)")

    result = {"device": torch.cuda.get_device_name() if cuda else "cpu", "commit": commit(),
              "date": datetime.date.today().isoformat(), "torch": torch.__version__,
              "transformers": transformers.__version__, "model": args.model, "spec": dict(models.MODELS[args.model]),
              "batch": 1, "new_tokens": args.new_tokens, "smoke": args.smoke, "rows": [],
              "note": "random bf16 weights, real shapes; decode ms/token from two generate() lengths; random "
                      "weights give ~0 draft acceptance: projected_tok_s = (1 + a) / step_ms"}
    sequences = {}
    with tempfile.TemporaryDirectory(dir=args.checkpoint_dir, prefix="bench_mtp_") as path:
        start = time.perf_counter()
        layers = save_with_mtp(args.model, path, device)
        result["checkpoint_save_s"] = time.perf_counter() - start
        result["checkpoint_gb"] = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)) / 1e9
        print(f"saved {args.model} + 1 MTP layer ({result['checkpoint_gb']:.2f} GB) in "
              f"{result['checkpoint_save_s']:.1f} s", flush=True)
        for variant in variants:
            mla_patch.unpatch()
            if variant == "patched":
                mla_patch.patch()  # before from_pretrained: the MtpModel generate() builds gets our attention too
            model = load(path, layers, device, experts)
            for prompt in (int(p) for p in args.prompts.split(",")):
                for mode in MODES[variant]:
                    row, sequences[variant, mode, prompt] = run_point(model, variant, mode, prompt, args.new_tokens,
                                                                      args.repeats)
                    plain = sequences.get((variant, "plain", prompt))
                    row["tokens_equal_plain"] = bool(torch.equal(plain, sequences[variant, mode, prompt]))
                    stock = sequences.get(("stock", mode if mode != "plain-eager" else "plain", prompt))
                    row["tokens_equal_stock"] = None if stock is None else float(
                        (stock == sequences[variant, mode, prompt]).float().mean())
                    result["rows"].append(row)
                    with open(os.path.join(args.out, "mtp.json"), "w") as f:
                        json.dump(result, f, indent=1, default=float)
                    extra = ""
                    if mode == "mtp":
                        extra = (f"  acceptance {row['accepted']}/{row['drafted']}  step {row['step_ms']:.2f} ms "
                                 f"(draft {row['draft_ms']:.2f} + verify {row['verify_ms']:.2f})  "
                                 f"MTP prefill {row['mtp_prefill_ms']:.1f} ms, load {row['mtp_load_s']:.2f} s  "
                                 f"at a=0.9: {row['projected_tok_s']['0.9']:.1f} tok/s")
                    print(f"{variant:8s} {mode:11s} L={prompt:6d} {row['decode_ms_per_token']:8.2f} ms/token "
                          f"{row['decode_tok_s']:8.1f} tok/s  wall {row['wall_s']:.2f} s{extra}", flush=True)
            del model
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
        mla_patch.unpatch()

    print("\n| variant | mode | L | ms/token | tok/s | acceptance | step ms (draft + verify) | tok/s at a=0.9 | "
          "tokens = plain |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in result["rows"]:
        mtp = r["mode"] == "mtp"
        print(f"| {r['variant']} | {r['mode']} | {r['prompt']} | {r['decode_ms_per_token']:.2f} | "
              f"{r['decode_tok_s']:.1f} | "
              + (f"{r['accepted']}/{r['drafted']} | {r['step_ms']:.2f} ({r['draft_ms']:.2f} + {r['verify_ms']:.2f}) | "
                 f"{r['projected_tok_s']['0.9']:.1f}" if mtp else "- | - | -")
              + f" | {r['tokens_equal_plain']} |")


if __name__ == "__main__":
    main()
