"""generate(..., use_mtp=True): DeepSeek-V3 multi-token prediction, stock against patched.

transformers' MTPCandidateGenerator builds an MtpModel (one decoder layer per MTP depth, plus enorm, hnorm, eh_proj,
shared_head.norm) from the main model's checkpoint, keys `model.layers.{num_hidden_layers + k}.*`. Each generate()
step drafts with it over its own MtpCache and verifies the draft with the main model, several tokens in one call.
After `mla_patch.patch()` both are decode calls: the draft over the MtpCache (a DynamicCache) and the verify over the
main model's LatentCache. Here a tiny float64 checkpoint is written to disk so that both models load the user's way.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from conftest import build_model, case_seed, rel_err, tiny_config
from transformers import AutoModelForCausalLM, GenerationConfig

import mla_patch
from mla_patch.attention import DECODE_MAX_NEW_TOKENS, MlaAttentionMixin


def _has_mtp() -> bool:
    try:
        from transformers.generation.candidate_generator import MTPCandidateGenerator  # noqa: F401
        from transformers.modeling_layers import MtpModel  # noqa: F401
    except ImportError:
        return False
    return hasattr(GenerationConfig(), "use_mtp")


pytestmark = pytest.mark.skipif(
    not _has_mtp(),
    reason=f"transformers {transformers.__version__} has no multi-token prediction (generate(use_mtp=True), MtpModel)",
)

MAIN_LAYERS = 2
PROMPT = 12  # the MTP layers' own prefill (PROMPT tokens) stays above DECODE_MAX_NEW_TOKENS: stock prefill
NEW_TOKENS = 16
assert PROMPT > DECODE_MAX_NEW_TOKENS


# Random weights draft tokens the main model almost never takes, which would leave the accepted-draft paths (the next
# draft over the accepted tokens, a shorter crop of the caches) untested. So the checkpoint makes the drafts good but
# not perfect: large embeddings, and each layer's writes to the residual stream (o_proj, the MLPs' down projections)
# scaled by RESIDUAL_SCALE, make the next token mostly a function of the current one; the MTP layers' eh_proj passes
# the embedding of their input token through, so they predict what the main model will. About half the drafts are
# accepted, and attention still moves the logits by several percent (a 1.5x softmax scale in the absorbed decode
# changes them by 5% or more).
RESIDUAL_SCALE = 0.2


def _write_checkpoint(path, num_mtp: int) -> None:
    """A tiny deepseek_v3 checkpoint of MAIN_LAYERS layers plus `num_mtp` MTP layers under model.layers.{2, 3..}."""
    from safetensors.torch import load_file, save_file

    total = MAIN_LAYERS + num_mtp
    full = build_model(tiny_config("deepseek_v3", num_hidden_layers=total, first_k_dense_replace=1),
                       dtype=torch.float64, seed=case_seed("mtp", num_mtp) % 1000)
    gen = torch.Generator().manual_seed(case_seed("mtp-weights", num_mtp))
    with torch.no_grad():
        for name, param in full.named_parameters():
            if "embed_tokens" in name:
                param.copy_(torch.randn(param.shape, dtype=param.dtype, generator=gen))
            elif name.endswith("o_proj.weight") or "down_proj" in name:
                param.mul_(RESIDUAL_SCALE)
    weights = full.state_dict()
    mtp_prefixes = tuple(f"model.layers.{i}." for i in range(MAIN_LAYERS, total))
    main = build_model(tiny_config("deepseek_v3", num_hidden_layers=MAIN_LAYERS, first_k_dense_replace=1,
                                   num_mtp_layers=num_mtp), dtype=torch.float64)
    main.load_state_dict({k: v for k, v in weights.items() if not k.startswith(mtp_prefixes)}, strict=True)
    main.save_pretrained(path)
    tensors = load_file(path / "model.safetensors")
    hidden = main.config.hidden_size
    for prefix in mtp_prefixes:  # the MTP block (MoE, as DeepSeek-V3's) and the MTP-only modules
        tensors.update({k: v.clone() for k, v in weights.items() if k.startswith(prefix)})
        for norm in ("enorm", "hnorm", "shared_head.norm"):
            tensors[f"{prefix}{norm}.weight"] = torch.ones(hidden, dtype=torch.float64)
        # eh_proj([enorm(embedding), hnorm(previous hidden)]): the embedding through, a little of the hidden state
        noise = torch.randn(hidden, hidden, dtype=torch.float64, generator=gen) * 0.1 / hidden**0.5
        tensors[prefix + "eh_proj.weight"] = torch.cat([torch.eye(hidden, dtype=torch.float64), noise], dim=1)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    made = {}

    def get(num_mtp: int = 1):
        if num_mtp not in made:
            made[num_mtp] = tmp_path_factory.mktemp(f"mtp{num_mtp}")
            _write_checkpoint(made[num_mtp], num_mtp)
        return made[num_mtp]

    return get


@pytest.fixture
def load(monkeypatch):
    """load(path, patched) -> model, the user's way (mla_patch.patch() before from_pretrained when patched).

    DeepseekV3's `_keys_to_ignore_on_load_unexpected` names the real checkpoint's MTP layer (61); transformers
    finds the MTP keys through it, so point it at this checkpoint's MTP layers."""
    from transformers import DeepseekV3ForCausalLM

    def load_model(path, patched: bool, num_mtp: int = 1):
        monkeypatch.setattr(DeepseekV3ForCausalLM, "_keys_to_ignore_on_load_unexpected",
                            [rf"model\.layers\.{MAIN_LAYERS + k}\..*" for k in range(num_mtp)])
        mla_patch.unpatch()
        if patched:
            mla_patch.patch()
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64, experts_implementation="eager").eval()

    return load_model


@pytest.fixture
def mtp_models(monkeypatch):
    """The MtpModel each generate(use_mtp=True) builds (MTPCandidateGenerator calls MtpModel.from_pretrained), and
    the logits of each draft (MtpModel._project_to_logits: the shared head's output, before any logits processor and
    in the model's dtype, where generate() hands on float32 copies)."""
    from transformers.modeling_layers import MtpModel

    built, draft_logits = [], []
    from_pretrained, project = MtpModel.from_pretrained.__func__, MtpModel._project_to_logits

    def spy_from_pretrained(cls, main_model, *args, **kwargs):
        built.append(from_pretrained(cls, main_model, *args, **kwargs))
        return built[-1]

    def spy_project(self, hidden_states):
        logits = project(self, hidden_states)
        draft_logits.append(logits.detach().clone())
        return logits

    monkeypatch.setattr(MtpModel, "from_pretrained", classmethod(spy_from_pretrained))
    monkeypatch.setattr(MtpModel, "_project_to_logits", spy_project)
    return built, draft_logits


@pytest.fixture
def verified(monkeypatch):
    """(drafted, accepted) per verify step: MTPCandidateGenerator.get_candidates' draft length, then the number of
    matches generate() hands update_candidate_strategy."""
    from transformers.generation.candidate_generator import MTPCandidateGenerator

    steps = []
    get_candidates, update = MTPCandidateGenerator.get_candidates, MTPCandidateGenerator.update_candidate_strategy

    def spy_get_candidates(self, input_ids, *args, **kwargs):
        candidates, logits = get_candidates(self, input_ids, *args, **kwargs)
        steps.append([candidates.shape[1] - input_ids.shape[1], None])
        return candidates, logits

    def spy_update(self, input_ids, scores, num_matches):
        steps[-1][1] = int(num_matches)
        return update(self, input_ids, scores, num_matches)

    monkeypatch.setattr(MTPCandidateGenerator, "get_candidates", spy_get_candidates)
    monkeypatch.setattr(MTPCandidateGenerator, "update_candidate_strategy", spy_update)
    return steps


@pytest.fixture
def attention_calls(monkeypatch):
    """One record per patched attention call: the module, its new tokens, whether it ran absorbed, the cache type."""
    calls = []
    forward, absorbed = MlaAttentionMixin.forward, MlaAttentionMixin._mla_absorbed_decode

    def spy_forward(self, *args, **kwargs):
        bound = self._mla_bind(args, kwargs)
        cache = bound.get("cache", bound.get("past_key_values"))
        calls.append({"module": self, "tokens": bound["hidden_states"].shape[1], "absorbed": False,
                      "cache": type(cache).__name__})
        return forward(self, *args, **kwargs)

    def spy_absorbed(self, *args, **kwargs):
        out = absorbed(self, *args, **kwargs)
        calls[-1]["absorbed"] = out is not None
        return out

    monkeypatch.setattr(MlaAttentionMixin, "forward", spy_forward)
    monkeypatch.setattr(MlaAttentionMixin, "_mla_absorbed_decode", spy_absorbed)
    return calls


def _prompt(seed, batch=1):
    return torch.randint(3, 97, (batch, PROMPT), generator=torch.Generator().manual_seed(seed))


def _max_rel(a, b) -> float:
    assert len(a) == len(b)
    return max(rel_err(y, x) for x, y in zip(a, b))


GREEDY = {"max_new_tokens": NEW_TOKENS, "min_new_tokens": NEW_TOKENS, "do_sample": False,
          "return_dict_in_generate": True, "output_logits": True}


@pytest.mark.parametrize("num_mtp", [1, 2])
def test_greedy_mtp_matches_stock_and_plain_greedy(checkpoints, load, mtp_models, num_mtp):
    """Patched generate(use_mtp=True) gives stock's tokens, verify logits and draft logits (float64), and the tokens
    of plain greedy generate()."""
    path, ids = checkpoints(num_mtp), _prompt(case_seed("greedy-mtp", num_mtp))
    _, draft_logits = mtp_models
    results = {}
    for patched in (False, True):
        model = load(path, patched, num_mtp)
        draft_logits.clear()
        mtp = model.generate(input_ids=ids, use_mtp=True, **GREEDY)
        results[patched] = mtp, list(draft_logits), model.generate(input_ids=ids, **GREEDY)
    (stock, stock_drafts, stock_plain), (got, got_drafts, got_plain) = results[False], results[True]

    assert stock.sequences.shape[1] == PROMPT + NEW_TOKENS
    assert torch.equal(got.sequences, stock.sequences)
    assert torch.equal(stock.sequences, stock_plain.sequences)  # MTP greedy is greedy
    assert torch.equal(got.sequences, got_plain.sequences)
    # the verify steps' logits, one per new token (generate() keeps float32 copies)
    assert _max_rel(got.logits, stock.logits) < 1e-6
    assert _max_rel(got.logits, got_plain.logits) < 1e-6
    assert len(got_drafts) == len(stock_drafts) > 1
    assert got_drafts[0].dtype == torch.float64
    assert _max_rel(got_drafts, stock_drafts) < 1e-10  # the MTP layers' draft logits
    assert isinstance(got.past_key_values, mla_patch.LatentCache)
    assert not isinstance(stock.past_key_values, mla_patch.LatentCache)


@pytest.mark.parametrize("num_mtp", [1, 2])
def test_draft_and_verify_run_absorbed(checkpoints, load, mtp_models, verified, attention_calls, num_mtp):
    """Every draft call (the MTP layers over their MtpCache) and every verify call (the main model, num_mtp + 1
    tokens a step, over its LatentCache) ran absorbed, after accepted and after rejected drafts; the two prefills (the
    main model over the prompt, the MTP layers over the prompt shifted by one) ran the stock computation; nothing
    fell back."""
    model = load(checkpoints(num_mtp), patched=True, num_mtp=num_mtp)
    built, _ = mtp_models
    mla_patch.reset_decode_stats()
    model.generate(input_ids=_prompt(case_seed("absorbed-mtp", num_mtp)), use_mtp=True, max_new_tokens=NEW_TOKENS,
                   min_new_tokens=NEW_TOKENS, do_sample=False)

    assert len(built) == 1
    mtp_attention = [layer.mtp_block.self_attn for layer in built[0].layers]
    assert len(mtp_attention) == num_mtp
    assert all(type(m).__name__.startswith("Mla") and isinstance(m, MlaAttentionMixin) for m in mtp_attention)
    main_attention = [layer.self_attn for layer in model.model.layers]
    assert all(type(m).__name__.startswith("Mla") for m in main_attention)

    # generate()'s loop: the main model's prefill (no draft), then draft + verify steps
    assert verified[0] == [0, 0]
    steps = verified[1:]
    assert steps and all(drafted == num_mtp for drafted, _ in steps)
    accepted = [a for _, a in steps]
    assert any(a > 0 for a in accepted) and any(a < num_mtp for a in accepted)  # both paths ran

    def of(modules):
        return [c for c in attention_calls if any(c["module"] is m for m in modules)]

    main_calls, mtp_calls = of(main_attention), of(mtp_attention)
    assert len(main_calls) + len(mtp_calls) == len(attention_calls)

    # main model: one prefill over the prompt, then one verify call per layer and step of num_mtp + 1 tokens
    assert [c["tokens"] for c in main_calls[:MAIN_LAYERS]] == [PROMPT] * MAIN_LAYERS
    assert not any(c["absorbed"] for c in main_calls[:MAIN_LAYERS])
    verify = main_calls[MAIN_LAYERS:]
    assert len(verify) == len(steps) * MAIN_LAYERS
    assert {c["tokens"] for c in verify} == {num_mtp + 1}
    assert all(c["absorbed"] and c["cache"] == "LatentCache" for c in verify)

    # MTP layers: at the first step their prefill over the prompt shifted by one (tokens 1 .. PROMPT, the last one
    # the main model's first), then drafts over the tokens the last verify accepted and the one it added; with
    # several MTP layers, a draft after fewer than num_mtp - 1 accepted tokens recomputes the last num_mtp rows too
    assert [c["tokens"] for c in mtp_calls[:num_mtp]] == [PROMPT] * num_mtp
    assert not any(c["absorbed"] for c in mtp_calls[:num_mtp])
    drafts = mtp_calls[num_mtp:]
    want = [a + 1 + (num_mtp if a < num_mtp - 1 else 0) for a in accepted[:-1] for _ in range(num_mtp)]
    assert [c["tokens"] for c in drafts] == want
    assert max(want) <= DECODE_MAX_NEW_TOKENS
    assert all(c["absorbed"] and c["cache"] == "MtpCache" for c in drafts)

    stats = mla_patch.decode_stats()
    assert stats["vanilla_fallbacks"] == 0
    assert stats["absorbed_calls"] == len(verify) + len(drafts)
    assert stats["prefill_calls"] == MAIN_LAYERS + num_mtp


def test_sampling_mtp_matches_stock(checkpoints, load, mtp_models):
    """do_sample=True (speculative sampling on the draft logits) with a fixed seed: patched gives stock's tokens."""
    path, ids = checkpoints(1), _prompt(case_seed("sample-mtp"))
    _, draft_logits = mtp_models
    out = {}
    for patched in (False, True):
        model = load(path, patched)
        draft_logits.clear()
        torch.manual_seed(case_seed("sample-seed"))
        out[patched] = model.generate(input_ids=ids, use_mtp=True, do_sample=True, max_new_tokens=NEW_TOKENS,
                                      min_new_tokens=NEW_TOKENS, top_k=0, temperature=1.0,
                                      return_dict_in_generate=True, output_logits=True)
        out[patched].drafts = list(draft_logits)
    assert out[False].sequences.shape[1] == PROMPT + NEW_TOKENS
    assert torch.equal(out[True].sequences, out[False].sequences)
    assert _max_rel(out[True].logits, out[False].logits) < 1e-6
    assert _max_rel(out[True].drafts, out[False].drafts) < 1e-10


def test_batch_over_one_is_transformers_error(checkpoints, load):
    """Assisted decoding, MTP included, takes one sequence: patched raises transformers' own error, as stock."""
    path, ids = checkpoints(1), _prompt(case_seed("batch-mtp"), batch=2)
    errors = {}
    for patched in (False, True):
        model = load(path, patched)
        with pytest.raises(ValueError, match="batch_size = 1") as err:
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), use_mtp=True, max_new_tokens=4,
                           do_sample=False)
        errors[patched] = str(err.value)
    assert errors[True] == errors[False]


def test_patch_loaded_model_patches_mtp_layer(checkpoints, load, mtp_models):
    """patch(model) on a loaded model: the draft model generate() builds later is patched with the model's options,
    its tokens equal stock's, and unpatch() leaves the next draft model stock."""
    ids = _prompt(case_seed("inplace-mtp"))
    stock = load(checkpoints(1), patched=False)
    expected = stock.generate(input_ids=ids, use_mtp=True, max_new_tokens=8, do_sample=False)
    model = load(checkpoints(1), patched=False)
    mla_patch.patch(model, backend="torch", absorb="merged")
    built, _ = mtp_models
    built.clear()
    got = model.generate(input_ids=ids, use_mtp=True, max_new_tokens=8, do_sample=False)
    draft_attention = built[-1].layers[0].mtp_block.self_attn
    assert isinstance(draft_attention, MlaAttentionMixin)
    assert (draft_attention.mla_backend, draft_attention.mla_absorb) == ("torch", "merged")
    assert torch.equal(got, expected)
    mla_patch.unpatch(model)
    model.generate(input_ids=ids, use_mtp=True, max_new_tokens=4, do_sample=False)
    assert not isinstance(built[-1].layers[0].mtp_block.self_attn, MlaAttentionMixin)
