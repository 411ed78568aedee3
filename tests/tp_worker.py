"""One rank of the tensor-parallel check (run by tests/test_tensor_parallel.py under torchrun).

    python -m torch.distributed.run --nproc_per_node 2 tests/tp_worker.py MODEL_DIR OUT.pt patch|stock [cpu|cuda]
"""

import os
import sys

import torch
from transformers import AutoModelForCausalLM

import mla_patch

model_dir, out_path, mode = sys.argv[1:4]
device = sys.argv[4] if len(sys.argv) > 4 else "cpu"  # "cuda": one GPU per rank, NCCL
if mode == "patch":
    mla_patch.patch()
if device == "cuda":
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, tp_plan="auto", experts_implementation="eager")
ids = torch.tensor([[5, 9, 12, 40, 7, 3, 22, 18, 31, 44], [0, 0, 0, 8, 17, 23, 4, 61, 70, 2]], device=model.device)
mask = (ids != 0).long()
out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False, output_logits=True,
                     return_dict_in_generate=True)
if int(os.environ.get("RANK", "0")) == 0:
    attn = next(m for m in model.modules() if hasattr(m, "kv_b_proj"))  # the first MLA attention (LongCat: a list)
    torch.save({"sequences": out.sequences.cpu(), "logits": torch.stack(out.logits).cpu(), "stats": mla_patch.decode_stats(),
                "class": type(attn).__name__, "local_heads": mla_patch.absorb.local_heads(attn)}, out_path)
