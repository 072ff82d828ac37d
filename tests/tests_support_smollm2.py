"""The transformers reference for the packaged SmolLM2 (loaded from the original GGUF, once)."""

from __future__ import annotations

import functools

import torch

from models import packaged_smollm2_gguf


@functools.lru_cache(maxsize=1)
def reference_smollm2():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = packaged_smollm2_gguf()
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True,
                                                 dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
    return model, tok
