"""lm-eval model `mla-hf`: HFLM whose log-likelihoods go through the absorbed MLA decode path.

lm-eval's own HF model scores every request with one full forward, which is prefill, which the patch
leaves vanilla. Here `loglikelihood` and `loglikelihood_rolling` (both funnel into
`_loglikelihood_tokens`) prefill the first `prefill_len` tokens and score the rest by teacher-forced
decode steps on the cache (`mla_patch.evals.scoring`), batched across requests with left padding.
`generate_until` is HFLM's, i.e. `model.generate()`, which decodes through the patch as well.

    mla-lm-eval --model mla-hf --model_args pretrained=default,scoring=decode ...   (lm-eval's CLI, model registered)

Model args: pretrained ("default" = the embedded model, or a local checkpoint dir), scoring
("decode" | "prefill": one full forward, the vanilla numbers), patch (apply mla_patch; default: true
when scoring=decode), backend ("auto" | "kernel" | "torch"), prefill_len, decode_step; the rest goes to HFLM.
"""

from __future__ import annotations

from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from . import scoring as _scoring


def _as_bool(value) -> bool:
    return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")


@register_model("mla-hf")
class MlaHFLM(HFLM):
    def __init__(
        self,
        pretrained="default",
        scoring: str = "decode",
        patch=None,
        backend: str = "auto",
        prefill_len: int = _scoring.DEFAULT_PREFILL_LEN,
        decode_step: int = _scoring.DEFAULT_DECODE_STEP,
        tokenizer=None,
        dtype="float32",
        device: str = "cpu",
        batch_size=8,
        **kwargs,
    ):
        if scoring not in ("decode", "prefill"):
            raise ValueError(f"mla-hf: scoring must be 'decode' or 'prefill', got {scoring!r}")
        if isinstance(pretrained, str) and pretrained in ("default", ""):
            # HFLM loads the embedded model from its directory (a path, not an object: no warnings); the
            # tokenizer comes loaded, as some transformers releases do not know its saved class name.
            from mla_patch.default_model import default_model_path, load_tokenizer

            pretrained, tokenizer = str(default_model_path()), tokenizer or load_tokenizer()
        super().__init__(
            pretrained=pretrained,
            tokenizer=tokenizer,
            dtype=dtype,
            device=device,
            batch_size=batch_size,
            **kwargs,
        )
        self.scoring = scoring
        self.prefill_len = int(prefill_len)
        self.decode_step = int(decode_step)
        if self.batch_size == "auto" or not str(self.batch_size).isdigit():
            raise ValueError("mla-hf: batch_size must be an integer")
        self.patched = _as_bool(scoring == "decode" if patch is None else patch)
        if self.patched:
            import mla_patch

            mla_patch.patch(self.model, backend=backend)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
        """requests: [(cache key or None, context tokens, continuation tokens)] -> [(logprob, is_greedy)]."""
        pairs = [(list(ctx), list(cont)) for _, ctx, cont in requests]
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eot_token_id
        results = _scoring.score_requests(
            self.model,
            pairs,
            pad_id=pad_id,
            max_length=self.max_length,
            scoring=self.scoring,
            batch_size=int(override_bs or self.batch_size),
            prefill_len=self.prefill_len,
            decode_step=self.decode_step,
        )
        for (key, _, _), answer in zip(requests, results):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
        return results

    def get_model_info(self) -> dict:
        info = super().get_model_info()
        info.update(
            mla_scoring=self.scoring,
            mla_patched=self.patched,
            mla_prefill_len=self.prefill_len,
            mla_decode_step=self.decode_step,
        )
        return info


__all__ = ["MlaHFLM"]
