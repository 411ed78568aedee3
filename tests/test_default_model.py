"""The embedded default model: shipped, small, an MLA DeepSeek-V2, trained, reproducible data."""

import json

import pytest
import torch

from dev import default_model_training as training
from mla_patch import default_model as dm


@pytest.fixture(scope="module")
def default_model():
    return dm.load_default_model(dtype=torch.float32, device="cpu")


def test_assets_shipped_and_small():
    files = {p.name: p.stat().st_size for p in dm.DEFAULT_MODEL_DIR.iterdir()}
    for name in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json", "stats.json"):
        assert name in files, f"{name} missing from {dm.DEFAULT_MODEL_DIR}"
    assert sum(files.values()) < 8 * 2**20, files


def test_loads_as_mla_deepseek_v2(default_model):
    model, tok = default_model
    cfg = model.config
    assert cfg.model_type == "deepseek_v2"
    assert (cfg.kv_lora_rank, cfg.qk_rope_head_dim) == (
        256,
        32,
    )  # served by the CUDA kernel (ops.KERNEL_DIMS)
    assert cfg.first_k_dense_replace < cfg.num_hidden_layers  # at least one MoE layer
    assert model.dtype == torch.float32 and not model.training
    assert tok.eos_token_id == cfg.eos_token_id and tok.pad_token_id is not None


def test_learned_far_below_uniform_and_copies(default_model):
    model, tok = default_model
    stats = json.loads((dm.DEFAULT_MODEL_DIR / "stats.json").read_text())["eval"]
    assert stats["token_ppl"] < stats["uniform_ppl"] / 20
    assert stats["span"]["top1_acc"] > 0.9 and stats["span"]["best_head_argmax_on_source"] > 0.8
    # Checked live too: a span seen once, 63 tokens back, is continued by greedy decoding.
    prompt = dm.DEMO_PROMPTS[0]
    span = prompt.split(" . again : ")[0].split()[2:]
    ids = tok(prompt, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    assert tok.decode(out[0, ids["input_ids"].shape[1] :]).split() == span[3:11]


def test_documents_deterministic_and_eval_data_reproducible():
    assert training.make_documents(5, 3) == training.make_documents(5, 3)
    assert training.make_documents(5, 3) != training.make_documents(5, 4)
    from mla_patch.evals import DATA_DIR

    rows = [json.loads(line)["text"] for line in (DATA_DIR / "mla_tiny_eval.jsonl").read_text().splitlines()]
    assert rows == training.make_documents(len(rows), training.EVAL_SEED)


def test_training_is_deterministic(tmp_path):
    a = training.train_default_model(tmp_path / "a", steps=2, batch_size=2, log=lambda *_: None)
    b = training.train_default_model(tmp_path / "b", steps=2, batch_size=2, log=lambda *_: None)
    assert a["final_loss_avg20"] == b["final_loss_avg20"]
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (
        tmp_path / "b" / "model.safetensors"
    ).read_bytes()


def test_missing_assets_are_an_error_that_says_how_to_get_them(tmp_path, monkeypatch):
    """The package only loads the shipped model; it never trains at run time."""
    from mla_patch import default_model

    monkeypatch.setattr(default_model, "DEFAULT_MODEL_DIR", tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="dev/train_default_model.py"):
        default_model.load_default_model()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_demo_parity_passes(dtype, capsys):
    from mla_patch import demo

    rc = demo.main(["--device", "cpu", "--dtype", dtype, "--max-new-tokens", "12", "--no-shape"])
    out = capsys.readouterr().out
    assert rc == 0 and "parity: PASS" in out, out[-600:]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_demo_parity_fails_on_wrong_decode_scale(dtype, capsys, wrong_decode_scale):
    """A decode that attends with 1.5x the softmax scale must fail the demo in either dtype's bar."""
    from mla_patch import demo

    rc = demo.main(["--device", "cpu", "--dtype", dtype, "--max-new-tokens", "12", "--no-shape"])
    out = capsys.readouterr().out
    assert rc == 1 and "parity: FAIL" in out, out[-600:]


def test_demo_shape_comparison_shows_what_absorption_saves():
    """At a DeepSeek-V3-like shape a patched decode step allocates a fraction of stock's (which re-expands
    the cache every step), and both keep the same latent bytes per cached token."""
    from mla_patch.demo_shape import compare_at_shape

    results = compare_at_shape("cpu", torch.float32, prompt=256, steps=3)
    stock, patched = results["stock"], results["patched"]
    assert patched["step_alloc_bytes"] < stock["step_alloc_bytes"] / 2
    assert patched["cache_bytes_per_token_layer"] == stock["cache_bytes_per_token_layer"] == (512 + 64) * 4
    assert stock["decode_tok_s"] > 0 and patched["decode_tok_s"] > 0


def test_demo_on_a_model_without_mla_says_so(tmp_path, capsys):
    """A checkpoint of another architecture: a plain message and exit status 2, no generation, no traceback."""
    import shutil

    from transformers import LlamaConfig, LlamaForCausalLM

    from mla_patch import demo
    from mla_patch.default_model import default_model_path

    config = LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (default_model_path() / name).exists():
            shutil.copy(default_model_path() / name, tmp_path / name)
    rc = demo.main(["--device", "cpu", "--model", str(tmp_path), "--no-shape"])
    out = capsys.readouterr().out
    assert rc == 2 and "has no MLA attention layer" in out and "llama" in out


def test_demo_on_cuda_without_a_gpu_names_the_problem(capsys):
    import pytest

    from mla_patch import demo

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    with pytest.raises(SystemExit) as exit_info:
        demo.main(["--device", "cuda"])
    assert exit_info.value.code == 2 and "no CUDA device is visible" in capsys.readouterr().err
