"""The embedded default model's training: its generated text, tokenizer and trainer (a dev tool).

`dev/train_default_model.py` runs it and writes `mla_patch/assets/mla-tiny/`; the package only loads
those files (`mla_patch.default_model`). Deterministic: fixed seeds, 2 threads, deterministic algorithms.
"""

from __future__ import annotations

import math
import os
import random
import time
from pathlib import Path

import torch

EOS = "<|endoftext|>"

# ---------------------------------------------------------------------------------------------------
# Training text
# ---------------------------------------------------------------------------------------------------
# Words as one string each, split: a compact, readable lexicon.
_DET = "the a one every that".split()  # noqa: SIM905
_ADJ = "old young small tall red green quiet brave tired little heavy bright dark happy cold warm".split()  # noqa: SIM905
_NOUN = (  # noqa: SIM905
    "farmer doctor girl boy child baker teacher dog cat bird fish horse mouse king queen man woman "
    "key box door window tree river road stone candle lamp bread apple cake book letter song"
).split()
_VERB = "finds sees carries opens paints follows likes takes holds watches helps brings".split()  # noqa: SIM905
_PREP = "near under behind beside above into".split()  # noqa: SIM905
# Words of copy spans and names: disjoint from the sentence lexicon, so an earlier match is a span or a
# name, never a sentence word.
_COPY_WORDS = sorted(
    set(
        """seven three nine four eight north south east west music paper silver winter summer cloud rain snow
    sugar salt yellow blue purple orange glass metal wood fire water iron gold copper sand milk tea rice
    corn bean plum pear lemon grape melon peach cherry onion pepper honey butter cheese egg soup coffee
    chair table bed cup plate spoon fork knife bottle basket rope wheel bell drum flute piano violin
    ship boat train truck bike plane car bus wagon tower bridge castle garden forest island valley hill
    lake ocean desert field market school church office bank farm shop lion tiger bear wolf fox deer
    rabbit goat sheep cow pig duck goose owl eagle frog snake spider bee ant whale shark crab tulip rose
    lily daisy oak pine maple moon sun star planet comet storm wind thunder ice frost fog dust smoke
    circle square triangle line dot arrow number letter word page ink pencil chalk brush paint""".split()  # noqa: SIM905
    )
    - set(_ADJ)
    - set(_NOUN)
    - set(_VERB)
    - set(_PREP)
    - set(_DET)
)


def _sentence(rng: random.Random, name: str | None = None, p_name: float = 0.0) -> str:
    def np_() -> list[str]:
        if name is not None and rng.random() < p_name:
            return [name]
        words = [rng.choice(_DET)]
        if rng.random() < 0.6:
            words.append(rng.choice(_ADJ))
        return words + [rng.choice(_NOUN)]

    words = np_() + [rng.choice(_VERB)] + np_()
    if rng.random() < 0.35:
        words += [rng.choice(_PREP)] + np_()
    return " ".join(words) + " ."


COPY_DOCS = 0.5  # share of copy-span documents
COPY_SPAN_WORDS = 60  # every copy span has this many words, so its repeat sits a fixed distance back
NAME_MENTION = 0.15  # chance that a noun phrase of a story is its named character


def make_documents(n_docs: int, seed: int) -> list[str]:
    """Deterministic documents of two kinds, both predictable only by attending far back:

    - story: `name : X .` then sentences in which noun phrases are, now and then, the name X (a random
      word from `_COPY_WORDS`, never used by the sentence grammar): each mention of X can only be
      predicted by finding the earlier ones, up to a couple of hundred tokens back;
    - copy span: `note : w1 .. wK . again : w1 .. wK .` with K random words: the repeat is predictable
      only by attending K + 3 tokens back.
    """
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        if rng.random() < COPY_DOCS:
            span = " ".join(rng.choice(_COPY_WORDS) for _ in range(COPY_SPAN_WORDS))
            docs.append(f"note : {span} . again : {span} .")
        else:
            name = rng.choice(_COPY_WORDS)
            body = " ".join(_sentence(rng, name, NAME_MENTION) for _ in range(rng.randint(4, 10)))
            docs.append(f"name : {name} . {body}")
    return docs


# ---------------------------------------------------------------------------------------------------
# Tokenizer and config
# ---------------------------------------------------------------------------------------------------
def train_tokenizer(texts: list[str], vocab_size: int = 1024):
    """Byte-level BPE (GPT-2 style pre-tokenization) wrapped as a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS,
        bos_token=EOS,
        pad_token=EOS,
        unk_token=EOS,
        model_max_length=512,
    )


def default_config(vocab_size: int):
    """MLA dims chosen so the CUDA kernel serves them: kv_lora_rank 256 with rope 32 (see ops.KERNEL_DIMS)."""
    from transformers import DeepseekV2Config

    return DeepseekV2Config(
        vocab_size=vocab_size,
        hidden_size=192,
        intermediate_size=384,
        num_hidden_layers=3,
        num_attention_heads=4,
        q_lora_rank=None,
        kv_lora_rank=256,
        qk_rope_head_dim=32,
        qk_nope_head_dim=32,
        v_head_dim=32,
        first_k_dense_replace=2,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_shared_experts=1,
        moe_intermediate_size=128,
        max_position_embeddings=512,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=None,  # a padding_idx would pin the EOS/BOS embedding to zero
        tie_word_embeddings=False,
    )


# ---------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------
TRAIN_SEED = 1234
EVAL_SEED = 777  # the held-out documents under mla_patch/evals/data use this seed
SEQ_LEN = 128  # a copy document (EOS + 125 tokens) fills one row
COPY_FIRST = 0.45  # share of the steps, at the start, that train on copy rows only
DECAY_FROM = 0.8  # constant learning rate until this fraction of the steps, then cosine decay


def _setup_determinism(seed: int, threads: int = 2) -> None:
    torch.manual_seed(seed)
    torch.set_num_threads(threads)  # the reduction order of CPU matmuls depends on the thread count
    torch.use_deterministic_algorithms(True, warn_only=True)


def _rows(token_docs: list[list[int]], eos: int, aligned: bool) -> torch.Tensor:
    """Training rows of SEQ_LEN tokens: each starts at a document (EOS first), as lm-eval scores them,
    continuing into the next documents; or (aligned=False) the packed stream cut every SEQ_LEN tokens."""
    rows, row, stream = [], [], []
    for enc in token_docs:
        if aligned:
            row += [eos] + enc
            if len(row) >= SEQ_LEN:
                rows.append(row[:SEQ_LEN])
                row = []
        else:
            stream += [eos] + enc
    if not aligned:
        rows = [stream[i : i + SEQ_LEN] for i in range(0, len(stream) - SEQ_LEN + 1, SEQ_LEN)]
    return torch.tensor(rows, dtype=torch.long)


def train_default_model(
    out_dir: str | os.PathLike,
    steps: int = 1000,
    batch_size: int = 16,
    lr: float = 2e-4,
    seed: int = TRAIN_SEED,
    log=print,
    device: str = "cpu",
    aligned: bool = True,
) -> dict:
    """Train the default model (on CPU by default) and save it (safetensors + tokenizer) to `out_dir`.

    Returns training stats. Deterministic for a given machine: seeds, 2 threads, deterministic algorithms.
    """
    from transformers import DeepseekV2ForCausalLM

    t0 = time.time()
    _setup_determinism(seed)
    n_docs = steps * batch_size * SEQ_LEN // 100 + 1000
    docs = make_documents(n_docs, seed)
    # The lexicon, repeated, makes every word (and every name) a single token of its own.
    lexicon = " ".join(sorted(set(_COPY_WORDS + _ADJ + _NOUN + _VERB + _PREP + _DET)))
    tokenizer = train_tokenizer(docs[:3000] + [lexicon] * 200)
    data = _rows(tokenizer(docs, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id, aligned)
    gen = torch.Generator().manual_seed(seed)
    # Curriculum: the first COPY_FIRST of the steps see copy-span rows only. On the mix alone the
    # far-back copy head forms late (a loss plateau of several hundred steps); on copy rows alone it
    # forms in a few hundred, and it stays once the sentences join.
    is_copy = data[:, 1] == tokenizer.convert_tokens_to_ids("note")
    copy_order = torch.nonzero(is_copy)[:, 0][torch.randperm(int(is_copy.sum()), generator=gen)]
    order = torch.randperm(len(data), generator=gen)
    copy_steps = int(steps * COPY_FIRST)

    config = default_config(len(tokenizer))
    model = DeepseekV2ForCausalLM(config).float().to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warmup, decay_from = max(1, steps // 50), int(steps * DECAY_FROM)

    def lr_at(step: int) -> float:  # warmup, constant, then cosine down to lr / 10
        if step < warmup:
            return lr * (step + 1) / warmup
        frac = max(0.0, (step - decay_from) / max(1, steps - decay_from))
        return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

    losses = []
    for step in range(steps):
        pick = step * batch_size + torch.arange(batch_size)
        rows = copy_order[pick % len(copy_order)] if step < copy_steps else order[pick % len(order)]
        batch = data[rows].to(device)
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 50 == 0 or step == steps - 1:
            log(f"step {step:4d}  loss {loss.item():.4f}  lr {lr_at(step):.2e}  {time.time() - t0:6.1f}s")
    train_time = time.time() - t0

    model.cpu().eval()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    stats = {
        "params": sum(p.numel() for p in model.parameters()),
        "steps": steps,
        "batch_size": batch_size,
        "seq_len": SEQ_LEN,
        "train_tokens": steps * batch_size * SEQ_LEN,
        "train_seconds": round(train_time, 1),
        "final_loss_avg20": round(sum(losses[-20:]) / len(losses[-20:]), 4),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    torch.use_deterministic_algorithms(False)
    return stats
