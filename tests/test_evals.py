"""mla_patch/evals/: decode-path scoring equals vanilla prefill scoring, really runs the absorbed path, and the
parity command fails on a broken decode. CPU, fp32, the embedded default model."""

import json

import pytest
import torch

import mla_patch
from mla_patch.evals import DATA_DIR, parity
from mla_patch.evals import scoring as sc
from mla_patch.default_model import load_default_model

FP32_REL = parity.THRESHOLDS["float32"]


@pytest.fixture(scope="module")
def model_tok():
    model, tok = load_default_model(dtype=torch.float32, device="cpu")
    yield model, tok
    mla_patch.unpatch(model)


@pytest.fixture(scope="module")
def ragged_batch(model_tok):
    """Four held-out documents of different lengths, left-padded: padding and masks are exercised."""
    _, tok = model_tok
    texts = [
        json.loads(line)["text"] for line in (DATA_DIR / "mla_tiny_eval.jsonl").read_text().splitlines()[:4]
    ]
    seqs = [[tok.eos_token_id] + tok(t)["input_ids"][:n] for t, n in zip(texts, (120, 97, 64, 23))]
    return sc.left_pad(seqs, tok.pad_token_id, "cpu")


def _rel(a, b, mask):
    a, b = a.double()[mask.bool()], b.double()[mask.bool()]
    return ((a - b).norm() / b.norm()).item()


def test_vanilla_decode_scoring_equals_prefill(model_tok, ragged_batch):
    """Unpatched: the teacher-forced decode loop itself is exact (positions, masks, cache)."""
    model, _ = model_tok
    mla_patch.unpatch(model)
    ids, mask = ragged_batch
    ref = sc.prefill_logprobs(model, ids, mask)
    got = sc.decode_logprobs(model, ids, mask, prefill_len=16, decode_step=3)
    assert _rel(got, ref, mask) < FP32_REL


def test_patched_decode_scoring_equals_vanilla_and_runs_absorbed(model_tok, ragged_batch):
    model, _ = model_tok
    ids, mask = ragged_batch
    mla_patch.unpatch(model)
    ref = sc.prefill_logprobs(model, ids, mask)
    mla_patch.patch(model, backend="torch")
    try:
        mla_patch.reset_decode_stats()
        fed = sc.STATS["decode_fed"]
        got = sc.decode_logprobs(model, ids, mask, prefill_len=16, decode_step=1)
        fed = sc.STATS["decode_fed"] - fed
        stats = mla_patch.decode_stats()
    finally:
        mla_patch.unpatch(model)
    B, L = ids.shape
    assert fed == B * (L - 16)
    assert stats["absorbed_tokens"] == fed, stats  # every column after the first chunk went absorbed
    assert _rel(got, ref, mask) < FP32_REL
    # Per-token log-probs of the real tokens agree, not just on average.
    tgt = ids[:, 1:, None]
    lp_got, lp_ref = got[:, :-1].gather(-1, tgt)[..., 0], ref[:, :-1].gather(-1, tgt)[..., 0]
    real = mask[:, 1:].bool() & mask[:, :-1].bool()
    assert (lp_got - lp_ref)[real].abs().max().item() < 1e-4


def test_mla_hf_prefill_scoring_equals_stock_hflm(model_tok):
    """scoring=prefill (the vanilla numbers) is lm-eval's own HFLM scoring."""
    from lm_eval.api.registry import get_model
    from lm_eval.models.huggingface import HFLM

    from mla_patch.evals.lm_model import MlaHFLM

    assert get_model("mla-hf") is MlaHFLM
    model, tok = model_tok
    mla_patch.unpatch(model)
    texts = [
        json.loads(line)["text"] for line in (DATA_DIR / "mla_tiny_eval.jsonl").read_text().splitlines()[:3]
    ]
    reqs = [(None, [tok.eos_token_id] + tok(t[:60])["input_ids"], tok(t[60:200])["input_ids"]) for t in texts]
    ours = MlaHFLM(pretrained=model, tokenizer=tok, scoring="prefill", batch_size=2)._loglikelihood_tokens(
        reqs
    )
    stock = HFLM(pretrained=model, tokenizer=tok, batch_size=2)._loglikelihood_tokens(reqs)
    for (a, ga), (b, gb) in zip(ours, stock):
        assert abs(a - b) < FP32_REL * abs(b) and ga == gb


def test_parity_command_passes(tmp_path, capsys):
    from mla_patch.default_model import DEFAULT_MODEL_DIR

    rc = parity.main(
        [
            "--model",
            str(DEFAULT_MODEL_DIR),
            "--limit",
            "4",
            "--gen-tokens",
            "12",
            "--batch-size",
            "4",
            "--prefill-len",
            "8",
            "--decode-step",
            "2",
            "--out",
            str(tmp_path),
        ]
    )
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert rc == 0 and last.startswith("parity: mla_tiny_") and last.endswith("PASS"), last
    report = json.loads(next(tmp_path.glob("parity_*.json")).read_text())
    assert report["decode_check"]["ok"] and all(g["first_divergence"] is None for g in report["generation"])
    assert (tmp_path / next(tmp_path.glob("parity_*.json")).name.replace(".json", ".md")).exists()


def test_parity_command_fails_on_wrong_decode_scale(tmp_path, capsys, wrong_decode_scale):
    """A decode that attends with 1.5x the softmax scale must not pass."""
    rc = parity.main(["--limit", "4", "--tasks", "mla_tiny_ppl", "--gen-tokens", "4", "--out", str(tmp_path)])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert rc == 1 and last.endswith("FAIL"), last


def test_the_lm_eval_command_runs_from_any_directory(tmp_path, monkeypatch, capsys):
    """`mla-lm-eval` (lm-eval's CLI with `mla-hf` registered and our tasks on its path) from outside the repo."""
    from mla_patch.evals import cli

    monkeypatch.chdir(tmp_path)
    rc = cli.main(["--model", "mla-hf", "--model_args", "pretrained=default,scoring=decode", "--tasks", "mla_tiny_ppl",
                   "--device", "cpu", "--batch_size", "4", "--limit", "2"])
    assert rc == 0 and "word_perplexity" in capsys.readouterr().out
