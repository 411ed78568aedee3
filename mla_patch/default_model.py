"""The embedded default model `mla-tiny`: a small DeepSeek-V2 (MLA attention, one MoE layer) + tokenizer.

`dev/train_default_model.py` (a dev script) trains it on CPU in about 3-4 minutes on 2 cores,
deterministically, on generated text: sentences of a small grammar (stories with a named character)
and copy spans, `note : <60 random words> . again : <the same 60 words> .`. The repeat can only be
predicted by attending 63 tokens back, to the first occurrence, so a wrong position, scale or mask in
the absorbed decode path shows up at once in perplexity and in greedy generation.

The trained files ship under `mla_patch/assets/mla-tiny/` (with `stats.json`: what it learned); this
module only loads them (it never trains).

    from mla_patch.default_model import DEMO_PROMPTS, load_default_model
    model, tokenizer = load_default_model(dtype=torch.float32, device="cpu")
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

DEFAULT_MODEL_NAME = "mla-tiny"
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "assets" / DEFAULT_MODEL_NAME

# Prompts for demos and the generation-agreement check (made once from the generator, seed 2024).
# Greedy continuations of the copy prompts stay exact for ~57 words only if decode attends 63 tokens back.
DEMO_PROMPTS = [
    (
        "note : snow fire wind milk four rabbit knife tower honey storm paint rice thunder garden music truck ocean "
        "tea chair fox snake drum tower frost rain brush page rice snake crab desert oak plane ocean owl four oak "
        "salt rice north west frost rabbit gold fox blue goat bean island summer north west rope copper ocean goose "
        "grape smoke pear deer . again : snow fire wind"
    ),
    (
        "note : four pencil star word dot knife plane onion office snake eight daisy ocean fox wind butter cloud "
        "farm arrow duck seven grape page gold chalk fork lion hill smoke knife spider thunder school rice four "
        "castle milk milk line deer water ink thunder cloud star garden fork plane field table goat north paint "
        "boat wind truck piano castle cow gold . again : four pencil star"
    ),
    (
        "name : brush . a baker holds brush . a red teacher watches that teacher . one tired doctor carries brush . "
        "that king helps brush behind brush . the old farmer sees"
    ),
    "every king likes that lamp . a fish paints every green river . the young doctor",
]


# ---------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------
def default_model_path() -> Path:
    """The shipped model dir (the package's assets)."""
    if (DEFAULT_MODEL_DIR / "model.safetensors").exists() and (DEFAULT_MODEL_DIR / "tokenizer.json").exists():
        return DEFAULT_MODEL_DIR
    raise FileNotFoundError(
        f"the embedded default model is missing from {DEFAULT_MODEL_DIR} (an install without package data?); "
        "reinstall mla_patch, or rebuild it with `python dev/train_default_model.py` from a checkout"
    )


def load_default_model(
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
    path: str | os.PathLike | None = None,
    attn_implementation: str | None = None,
):
    """Load the embedded default model (or a checkpoint dir at `path`) -> (model, tokenizer), eval mode.

    dtype: torch dtype or its name ("float32", "bfloat16", ...); device: where the weights go.
    Works offline: only local files are read.
    """
    from transformers import AutoModelForCausalLM

    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    path = Path(path) if path is not None else default_model_path()
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True, **kwargs)
    return model.to(device).eval(), load_tokenizer(path)


def load_tokenizer(path: str | os.PathLike | None = None):
    """The tokenizer of the embedded model (or of the checkpoint dir at `path`), from local files only."""
    from transformers import AutoTokenizer

    path = Path(path) if path is not None else default_model_path()
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (ValueError, KeyError):  # a release that does not know the saved tokenizer_class name
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)
