"""Serving throughput through transformers' HTTP server (`transformers serve --continuous-batching`), stock against
patched (`mla_patch.serve`).

The model: a shape of benchmarks/models.py (`--model`, `--layers` to keep fewer decoder layers) with random bf16
weights (`models.build`), saved with save_pretrained to a folder (a temporary one unless --model-dir) with the
tokenizer embedded in mla_patch (assets/mla-tiny, byte-level BPE). The server needs a tokenizer, and every id the
random model generates must decode: the model's vocab_size is set to the tokenizer's (798), a shape change of the
embedding and lm_head only (the attention and MoE shapes are the model's). Its configs have no end-of-sequence
token, so every request generates exactly max_tokens; the tokens each request got are counted from its `usage`
(stream_options.include_usage) and reported (`short_requests`: those with fewer than asked).

Per variant, one after the other (never both on the GPU at once), on the same saved model: the server is started
with the model on its command line (loaded once, `--device`, `--dtype bfloat16`, `--continuous-batching` with
`--cb-block-size` and, where given, `--cb-num-blocks`, `--max-model-len` = longest prompt + new tokens, as
generate_batch sizes its block table), /health is waited for, two warm-up requests are made (streamed and not,
short answers: their token counts check that max_tokens is honoured), then `--requests` clients (threads, the
standard library's http.client) send at once a streamed text completion (`/v1/completions`, `stream: true`,
temperature 0) of a `--prompt`-token prompt (random token ids of bench_serving.prompts_for turned into text and
trimmed so the tokenizer gives about that many tokens; the real counts are recorded) with `--new-tokens` max_tokens;
with --mixed, each request's prompt length and max_tokens are drawn as bench_serving.py --mixed draws them (prompts
between half and all of `--prompt`, outputs between a quarter and all of `--new-tokens`, the same seeds).
Measured: wall time (first request sent to last answer done), requests/s, output tokens/s (end to end, and in the
decode phase: tokens after each request's first over the time from the first first token to the last token), time
to first token p50/p90 (the first streamed chunk with text), inter-token latency p50/p90/p99 (`token_ms_*`: the gaps
between a request's streamed chunks; a chunk holds one token's text, or more when the server fell behind or a token
decodes to no text alone, as a partial UTF-8 byte does: `chunks` against `output_tokens` tells how close chunks are to
tokens), per-request time per output token (`tpot_ms_*`: (last chunk - first chunk) / (tokens - 1)), and failed
requests. From the server's log: that the patch was applied, whether the decode fell back to the PyTorch reference or
to the stock attention, and the absorbed decode's counters. The patched server runs `mla_patch.serve.main` (what
`python -m mla_patch.serve` runs) as `python -m benchmarks.bench_serving_http --serve-patched ...`, whose model
process also prints `mla_patch.decode_stats()` to the log when it changes (absorbed tokens and calls, graph replays);
`--plain-serve` runs `python -m mla_patch.serve` itself, and then only the log's warnings tell. The stock server is
`transformers serve` run as tests/test_serve.py runs it. Each server's log is written under --out
(serve_<variant>.log); the log also tells whether continuous batching switched the attention to flash attention
(it does where a flash kernel is installed; HF_HUB_OFFLINE is set, so none is fetched). On the GPU, the decode phase's
floor is recorded as bench_serving.py does it.

Writes serving_http.json under --out (after each variant) and prints one line per variant. Stock and patched can
run in two calls (--variants stock, then --variants patched --merge [JSON]): the second keeps the first's variant
from its JSON when the workload is the same, and --model-dir lets it reuse the saved model. --smoke: tiny shapes on
the CPU with a few requests (checks the script, not speed).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from http.client import HTTPConnection

if __package__ in (None, ""):  # run as a file: the repo root first, so `benchmarks` and `mla_patch` import
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import torch

import mla_patch
from benchmarks import models
from benchmarks.bench_generate import step_bytes
from benchmarks.bench_serving import latent_bytes_per_token, output_lengths_for, prompts_for
from benchmarks.provenance import commit
from benchmarks.timing import copy_bandwidth_gbs, percentile
from mla_patch.default_model import DEFAULT_MODEL_DIR

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STOCK_CLI = "from transformers.cli.transformers import main; import sys; sys.argv[0] = 'transformers'; main()"
STATS_LINE = "mla_patch decode_stats "
SPEC_FILE = "bench_serving_http_spec.json"  # in a saved model's folder: what it was built from, for --model-dir reuse
VARIANTS = ("stock", "patched")
# What makes two runs the same workload (--merge)
WORKLOAD_KEYS = ("model", "layers", "requests", "prompt", "new_tokens", "mixed", "block_size", "num_blocks",
                 "server_args", "device", "torch", "transformers")
LOG_MARKS = {  # what the server's log shows, and what it means
    "patch_applied": "mla_patch: serving with",
    "reference_decode": "decode attention uses the PyTorch reference",
    "stock_attention_fallback": "decode runs the stock attention",
    "left_untouched": "left untouched",
    "switched_to_flash": "Continuous batching is much better when using flash attention. Switching",
}


# ----- the model and the prompts -----


def tokenizer_vocab():
    """The embedded tokenizer (mla-tiny's) and its vocabulary size."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR)
    return tok, len(tok)


def shape_facts(args, vocab, on_gpu, mean_context) -> dict:
    """What the results record about the model's shapes, from a copy on the meta device: latent bytes, parameters,
    and on the GPU the decode phase's floor as bench_serving.py records it (a step of every request at its mean
    context, `mean_context` tokens, reads step_bytes, over the measured copy bandwidth)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(models.model_config(args.model), dtype=torch.bfloat16)
    facts = {"latent_bytes_per_token_layer": latent_bytes_per_token(model),
             "num_hidden_layers": model.config.num_hidden_layers, "vocab_size": vocab,
             "params": sum(p.numel() for p in model.parameters())}
    if on_gpu:
        facts["copy_gbs"] = copy_bandwidth_gbs()
        facts["decode_step_floor_ms"] = step_bytes(model, args.requests, mean_context) / facts["copy_gbs"] / 1e6
        facts["decode_floor_tokens_per_s"] = args.requests / facts["decode_step_floor_ms"] * 1e3
        torch.cuda.empty_cache()
    return facts


def save_model(args, device, folder, tok) -> float:
    """Builds the random model (models.MODELS[args.model] as set up by main), saves it with the tokenizer to
    `folder`, frees it, and returns the seconds it took; a folder holding the same model already is reused (0 s)."""
    from transformers import GenerationConfig

    spec = {"shape": models.MODELS[args.model], "smoke": args.smoke}
    spec_path = os.path.join(folder, SPEC_FILE)
    if os.path.exists(spec_path):
        with open(spec_path) as f:
            if json.load(f) == spec:
                print(f"reusing the model saved in {folder}", flush=True)
                return 0.0
    start = time.perf_counter()
    model = models.build(args.model, device)
    # No end of sequence anywhere (the config's and the generation config's): every request runs to max_tokens.
    model.config.eos_token_id = None
    model.config.bos_token_id = model.config.pad_token_id = tok.pad_token_id
    model.generation_config = GenerationConfig(do_sample=False, eos_token_id=None, bos_token_id=tok.pad_token_id,
                                               pad_token_id=tok.pad_token_id)
    os.makedirs(folder, exist_ok=True)
    model.save_pretrained(folder)
    tok.model_max_length = model.config.max_position_embeddings  # no "longer than the maximum" warnings
    tok.save_pretrained(folder)
    del model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    with open(spec_path, "w") as f:
        json.dump(spec, f, indent=1)
    seconds = time.perf_counter() - start
    print(f"saved the model to {folder} in {seconds:.0f} s", flush=True)
    return seconds


def prompt_texts(tok, lengths, vocab) -> tuple[list[str], list[int]]:
    """Texts the tokenizer turns into about `lengths[i]` tokens each (random ids of prompts_for, decoded, re-encoded
    and cut at that many tokens: decoding and encoding again does not give back the same ids), and their counts."""
    texts, counts = [], []
    for ids, length in zip(prompts_for(len(lengths), 2 * max(lengths), False, vocab), lengths):
        text = tok.decode(ids)
        for _ in range(4):  # cut at `length` tokens; re-encoding the cut text moves the count by a token or two
            ids = tok(text)["input_ids"]
            if len(ids) == length:
                break
            text = tok.decode(ids[:length])
        texts.append(text)
        counts.append(len(tok(text)["input_ids"]))
    return texts, counts


# ----- the servers -----


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(variant, plain_serve) -> list[str]:
    if variant == "stock":
        return [sys.executable, "-c", STOCK_CLI, "serve"]
    if plain_serve:
        return [sys.executable, "-m", "mla_patch.serve"]
    return [sys.executable, "-m", "benchmarks.bench_serving_http", "--serve-patched"]


class Server:
    """One server process (its own process group, so that its model process stops with it), logging to `log`."""

    def __init__(self, command, log_path):
        env = dict(os.environ, TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1",
                   HF_HUB_DISABLE_UPDATE_CHECK="1", PYTHONPATH=os.pathsep.join(
                       [REPO, *filter(None, [os.environ.get("PYTHONPATH")])]))
        self.command, self.log_path = command, log_path
        with open(log_path, "w") as log:  # the server writes to its own copy of the descriptor
            log.write("$ " + shlex.join(command) + "\n")
            log.flush()
            self.proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                         start_new_session=True)

    def wait_healthy(self, port, timeout) -> float:
        start = time.perf_counter()
        while True:
            try:
                conn = HTTPConnection("127.0.0.1", port, timeout=5)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    return time.perf_counter() - start
            except OSError:
                pass
            if self.proc.poll() is not None or time.perf_counter() - start > timeout:
                self.stop()
                raise SystemExit(f"the server did not come up ({shlex.join(self.command)}):\n{self.log_text()[-4000:]}")
            time.sleep(1)

    def log_text(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def stop(self) -> None:
        """SIGTERM to the server's process group, SIGKILL after 60 s; returns once none of its processes is left."""
        if self.proc.returncode is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        start, killed = time.time(), False
        while time.time() - start < 90:  # a zombie nobody reaps would stay in the group: give up after 90 s
            self.proc.poll()  # reaps the server itself
            try:
                os.killpg(self.proc.pid, 0)  # still a process in the group (the model's process, say)?
            except ProcessLookupError:
                break
            if time.time() - start > 60 and not killed:
                os.killpg(self.proc.pid, signal.SIGKILL)
                killed = True
            time.sleep(0.5)
        self.proc.wait()


# ----- the clients -----


def complete(port, body, timeout, barrier=None) -> dict:
    """One /v1/completions request. Streamed: the arrival time of each chunk with text, the usage; else the usage.
    Times are time.perf_counter() values."""
    record = {"chunks": [], "error": None, "usage": None, "finish_reason": None}
    conn = HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        payload = json.dumps(body).encode()
        if barrier is not None:
            barrier.wait()
        record["sent"] = time.perf_counter()
        conn.request("POST", "/v1/completions", payload, {"content-type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            record["error"] = f"HTTP {resp.status}: {resp.read()[:300]!r}"
            return record
        if not body.get("stream"):
            answer = json.loads(resp.read())
            record["usage"] = answer.get("usage")
            record["finish_reason"] = answer["choices"][0].get("finish_reason")
            record["text"] = answer["choices"][0].get("text")
            return record
        while True:
            line = resp.readline()
            if not line:
                break
            now = time.perf_counter()
            if not line.startswith(b"data: "):
                continue
            data = line[6:].strip()
            if data == b"[DONE]":
                break
            chunk = json.loads(data)
            if "error" in chunk:
                record["error"] = str(chunk["error"])[:300]
                break
            if chunk.get("usage"):
                record["usage"] = chunk["usage"]
            for choice in chunk.get("choices") or []:
                if choice.get("text"):
                    record["chunks"].append(now)
                if choice.get("finish_reason"):
                    record["finish_reason"] = choice["finish_reason"]
    except Exception as err:  # noqa: BLE001 (a failed request is counted, the others go on)
        record["error"] = f"{type(err).__name__}: {err}"
    finally:
        record["done"] = time.perf_counter()
        conn.close()
    return record


def request_body(model_dir, prompt, max_tokens, stream) -> dict:
    body = {"model": model_dir, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


def run_clients(port, model_dir, prompts, max_tokens, timeout) -> list[dict]:
    """Every prompt as a streamed request of its own thread, all sent at once; `max_tokens`: one for all, or a list
    (one per prompt)."""
    if isinstance(max_tokens, int):
        max_tokens = [max_tokens] * len(prompts)
    barrier = threading.Barrier(len(prompts))
    records = [None] * len(prompts)

    def client(i):
        records[i] = complete(port, request_body(model_dir, prompts[i], max_tokens[i], True), timeout, barrier)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return records


def completion_tokens(record) -> int | None:
    return (record["usage"] or {}).get("completion_tokens")


def measure(records, max_tokens: list[int]) -> dict:
    """The run's figures; `max_tokens`: what each request asked for."""
    asked = [m for r, m in zip(records, max_tokens) if r["error"] is None and r["chunks"]]
    ok = [r for r in records if r["error"] is None and r["chunks"]]
    start = min(r["sent"] for r in records)
    wall = max(r["done"] for r in records) - start
    # A request's tokens: its usage (exact); its chunk count where a stream ended without one.
    tokens = [completion_tokens(r) if completion_tokens(r) is not None else len(r["chunks"]) for r in ok]
    first = [r["chunks"][0] - r["sent"] for r in ok]
    gaps = [b - a for r in ok for a, b in zip(r["chunks"], r["chunks"][1:])]
    tpot = [(r["chunks"][-1] - r["chunks"][0]) / (k - 1) for r, k in zip(ok, tokens) if k > 1 and len(r["chunks"]) > 1]
    out = sum(tokens)
    decode_span = max((r["chunks"][-1] for r in ok), default=0) - min((r["chunks"][0] for r in ok), default=0)
    prompt_tokens = [(r["usage"] or {}).get("prompt_tokens") for r in ok if r["usage"]]
    return {
        "wall_s": wall,
        "requests_per_s": len(ok) / wall,
        "output_tokens_per_s": out / wall,
        "decode_tokens_per_s": (out - len(ok)) / max(decode_span, 1e-9),
        "ttft_s_p50": percentile(first, 50),
        "ttft_s_p90": percentile(first, 90),
        "token_ms_p50": 1e3 * percentile(gaps, 50),
        "token_ms_p90": 1e3 * percentile(gaps, 90),
        "token_ms_p99": 1e3 * percentile(gaps, 99),
        "tpot_ms_p50": 1e3 * percentile(tpot, 50),
        "tpot_ms_p90": 1e3 * percentile(tpot, 90),
        "failed": len(records) - len(ok),
        "errors": sorted({r["error"] for r in records if r["error"]})[:5],
        "output_tokens": out,
        "chunks": sum(len(r["chunks"]) for r in ok),
        "short_requests": sum(k < m for k, m in zip(tokens, asked)),
        "completion_tokens_min": min(tokens, default=0),
        "completion_tokens_max": max(tokens, default=0),
        "usage_missing": sum(r["usage"] is None for r in ok),
        "server_prompt_tokens_min": min(filter(None, prompt_tokens), default=None),
        "server_prompt_tokens_max": max(filter(None, prompt_tokens), default=None),
        "finish_reasons": sorted({str(r["finish_reason"]) for r in ok}),
    }


def decode_stats_lines(text) -> list[dict]:
    return [json.loads(line.split(STATS_LINE, 1)[1]) for line in text.splitlines() if STATS_LINE in line]


def log_facts(text, before, after) -> dict:
    """What the server's log shows (see LOG_MARKS); `before`/`after`: its text up to the timed run and after it."""
    facts = {key: mark in text for key, mark in LOG_MARKS.items()}
    backend = [line.split("decode backend: ", 1)[1].strip() for line in text.splitlines() if "decode backend: " in line]
    if backend:
        facts["decode_backend"] = backend[-1]
    stats_before, stats_after = decode_stats_lines(before), decode_stats_lines(after)
    if stats_after:
        base = stats_before[-1] if stats_before else {}
        facts["decode_stats_timed_run"] = {k: v - base.get(k, 0) for k, v in stats_after[-1].items()}
    return facts


def run_variant(variant, args, model_dir, texts, output_lengths, max_model_len) -> dict:
    port = free_port()
    command = [*server_command(variant, args.plain_serve), model_dir, "--host", "127.0.0.1", "--port", str(port),
               "--device", args.device, "--dtype", "bfloat16", "--continuous-batching",
               "--cb-block-size", str(args.block_size), "--max-model-len", str(max_model_len)]
    if args.num_blocks:
        command += ["--cb-num-blocks", str(args.num_blocks)]
    command += shlex.split(args.server_args)
    os.makedirs(args.out, exist_ok=True)
    server = Server(command, os.path.join(args.out, f"serve_{variant}.log"))
    try:
        startup = server.wait_healthy(port, args.startup_timeout)
        # Warm-up: two streamed requests (first-call set-up, kernels loaded) and a non-streamed one; all ask for a
        # short answer, and their token counts check that max_tokens is honoured (no end of sequence).
        warm_tokens = min(args.new_tokens, 16)
        warm = run_clients(port, model_dir, texts[:2], warm_tokens, args.request_timeout)
        whole = complete(port, request_body(model_dir, texts[0][:200], warm_tokens, False), args.request_timeout)
        warmup = {"max_tokens": warm_tokens, "streamed_completion_tokens": [completion_tokens(r) for r in warm],
                  "non_streamed_completion_tokens": completion_tokens(whole),
                  "errors": [r["error"] for r in [*warm, whole] if r["error"]]}
        warmup["max_tokens_honoured"] = all(completion_tokens(r) == warm_tokens for r in [*warm, whole])
        if warmup["errors"]:
            raise SystemExit(f"{variant}: the warm-up failed: {warmup['errors']}\n{server.log_text()[-3000:]}")
        time.sleep(2.5)  # the model process's decode_stats line for the warm-up is out
        before = server.log_text()
        records = run_clients(port, model_dir, texts, output_lengths, args.request_timeout)
        time.sleep(2.5)
        after = server.log_text()
    finally:
        server.stop()
    result = measure(records, output_lengths)
    result.update(startup_s=startup, warmup=warmup, command=shlex.join(command),
                  log=log_facts(server.log_text(), before, after))
    return result


# ----- the patched server's model process: its decode counters in the log -----


def report_decode_stats(interval=1.0) -> None:
    """In the model process: prints mla_patch.decode_stats() (a line starting with STATS_LINE) whenever it changed."""

    def loop():
        print(f"mla_patch: decode backend: {mla_patch.status()['decode_backend']}", flush=True)
        last = None
        while True:
            stats = mla_patch.decode_stats()
            if stats != last:
                print(STATS_LINE + json.dumps(stats), flush=True)
                last = stats
            time.sleep(interval)

    threading.Thread(target=loop, name="mla-decode-stats", daemon=True).start()


def serve_patched(argv) -> None:
    """`python -m benchmarks.bench_serving_http --serve-patched [transformers serve options]`: mla_patch.serve."""
    from mla_patch import serve

    serve.main(argv)


# ----- main -----


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--model", default="v2-lite", choices=sorted(models.MODELS))
    ap.add_argument("--layers", type=int, default=0, help="keep this many decoder layers (0: the model's)")
    ap.add_argument("--requests", type=int, default=None, help="concurrent clients (default 64; smoke 4)")
    ap.add_argument("--prompt", type=int, default=None, help="prompt tokens (default 4096; smoke 48)")
    ap.add_argument("--new-tokens", type=int, default=None, help="max_tokens of each request (default 256; smoke 8)")
    ap.add_argument("--mixed", action="store_true",
                    help="prompts of half to all of --prompt tokens, max_tokens a quarter to all of --new-tokens")
    ap.add_argument("--block-size", type=int, default=None, help="--cb-block-size (default 256; smoke 32)")
    ap.add_argument("--num-blocks", type=int, default=None,
                    help="--cb-num-blocks (default: not passed, transformers sizes the cache from free memory; smoke 64)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="which servers, in this order")
    ap.add_argument("--server-args", default="", help="more options for both servers, e.g. '--cb-use-cuda-graph'")
    ap.add_argument("--plain-serve", action="store_true",
                    help="patched server as `python -m mla_patch.serve` itself (no decode counters in its log)")
    ap.add_argument("--model-dir", default=None,
                    help="save the model here and keep it (reused when it holds the same model); default: a temp dir")
    ap.add_argument("--merge", nargs="?", const="", default=None, metavar="JSON",
                    help="keep the variants this run leaves out from an earlier serving_http.json of the same workload "
                         "(JSON; --out's when no path is given): stock and patched in two calls")
    ap.add_argument("--device", default=None, help="the servers' --device (default cuda; smoke cpu)")
    ap.add_argument("--startup-timeout", type=float, default=1800)
    ap.add_argument("--request-timeout", type=float, default=1800, help="seconds a client waits for the next bytes")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU, few requests: checks the script")
    args = ap.parse_args(argv)
    smoke = {"requests": 4, "prompt": 48, "new_tokens": 8, "block_size": 32, "num_blocks": 64, "device": "cpu"}
    full = {"requests": 64, "prompt": 4096, "new_tokens": 256, "block_size": 256, "num_blocks": 0, "device": "cuda"}
    for key, value in (smoke if args.smoke else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    variants = args.variants.split(",")
    if any(v not in VARIANTS for v in variants) or len(set(variants)) != len(variants):
        raise SystemExit(f"--variants: some of {VARIANTS}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: --smoke runs on the CPU")
    if args.smoke:
        models.shrink(q_lora_rank=32, n_routed_experts=4, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, intermediate_size=96,
                      moe_intermediate_size=32)
    build_device = "cuda" if args.device.startswith("cuda") else "cpu"
    tok, vocab = tokenizer_vocab()
    models.MODELS[args.model]["vocab_size"] = vocab
    if args.layers:
        models.MODELS[args.model]["num_hidden_layers"] = args.layers
    lengths = [len(p) for p in prompts_for(args.requests, args.prompt, args.mixed, vocab)]  # bench_serving's draws
    texts, counts = prompt_texts(tok, lengths, vocab)
    output_lengths = output_lengths_for(args.requests, args.new_tokens, args.mixed)
    max_model_len = max(counts) + max(output_lengths)

    import transformers

    results = {"model": args.model, "layers": args.layers or None, "requests": args.requests, "prompt": args.prompt,
               "prompt_tokens_min": min(counts), "prompt_tokens_mean": sum(counts) / len(counts),
               "prompt_tokens_max": max(counts), "new_tokens": args.new_tokens, "mixed": args.mixed,
               "output_lengths": output_lengths, "block_size": args.block_size,
               "num_blocks": args.num_blocks or None, "max_model_len": max_model_len, "server_args": args.server_args,
               "commit": commit(), "device": torch.cuda.get_device_name() if build_device == "cuda" else "cpu",
               "torch": torch.__version__, "transformers": transformers.__version__,
               "vocab_note": f"vocab_size set to the embedded mla-tiny tokenizer's ({vocab}) so that every generated id "
                             "decodes: a shape change of the embedding and lm_head only",
               "eos_note": "no eos_token_id in the saved config or generation config: each request runs to max_tokens"}
    keep = args.model_dir is not None
    model_dir = os.path.abspath(args.model_dir) if keep else tempfile.mkdtemp(prefix="bench_serving_http_")
    mean_context = sum(counts) / len(counts) + sum(output_lengths) / len(output_lengths) / 2
    results.update(shape_facts(args, vocab, build_device == "cuda", mean_context))
    path = os.path.join(args.out, "serving_http.json")
    merge = (args.merge or path) if args.merge is not None else None
    if merge and not os.path.exists(merge):
        raise SystemExit(f"--merge: no {merge}")
    if merge:  # the other variants of an earlier run of the same workload
        with open(merge) as f:
            earlier = json.load(f)
        if all(earlier.get(k) == results[k] for k in WORKLOAD_KEYS):
            for variant in set(VARIANTS) - set(variants):
                if variant in earlier:
                    results[variant] = earlier[variant]
                    results[f"{variant}_commit"] = earlier["commit"]
                    print(f"{variant}: kept from {merge} (commit {earlier['commit']})", flush=True)
        else:
            raise SystemExit(f"--merge: {merge} is another workload")
    os.makedirs(args.out, exist_ok=True)
    try:
        results["build_and_save_s"] = save_model(args, build_device, model_dir, tok)
        for variant in variants:
            results[variant] = run_variant(variant, args, model_dir, texts, output_lengths, max_model_len)
            row = {k: v for k, v in results[variant].items() if k not in ("command", "warmup")}
            print(variant, json.dumps(row, default=float), flush=True)
            write_json(path, results)  # after each variant: a later failure keeps the earlier ones
    finally:
        if not keep:
            import shutil

            shutil.rmtree(model_dir, ignore_errors=True)
    if "stock" in results and "patched" in results:
        stock, mine = results["stock"], results["patched"]
        mine.update(speedup_output_tokens=mine["output_tokens_per_s"] / stock["output_tokens_per_s"],
                    speedup_decode_tokens=mine["decode_tokens_per_s"] / stock["decode_tokens_per_s"])
        print(f"patched: output tokens/s {mine['speedup_output_tokens']:.2f}x stock, decode phase "
              f"{mine['speedup_decode_tokens']:.2f}x; failed requests {stock['failed']} stock, {mine['failed']} patched")
    write_json(path, results)


def write_json(path, results) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(results, f, indent=1, default=float)
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--serve-patched"]:
        serve_patched(sys.argv[2:])
    else:
        main()
elif __name__ == "__mp_main__":  # the patched server's model process (spawned): the patch, and its counters
    mla_patch.patch()
    report_decode_stats()
