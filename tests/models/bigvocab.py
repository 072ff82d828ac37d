"""A Gemma-3-270M-shaped checkpoint with a real-sized 262k-token tokenizer, built offline (fixed seed).

    python -m tests.models.bigvocab OUT_DIR [--layers N]

The model is transformers' ``Gemma3ForCausalLM`` (vocabulary 262144, hidden 640, 18 layers, tied embedding,
bfloat16) with random weights; the tokenizer is transformers' ``GemmaTokenizer`` (byte-fallback BPE) over a
vocabulary of the same size, built in-process: special and 6000 ``<unusedN>`` added tokens like Gemma's, the 256
byte tokens, characters, their pairs and triples, with the merges that make them (a ``tokenizer.json`` of the
real one's size, ~30 MB). Nothing is downloaded.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

VOCAB = 262144
SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]
UNUSED = 6000
CHARS = list("▁abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:!?'\"()-") + \
    [chr(c) for c in range(0x4E00, 0x4E00 + 60)] + [chr(c) for c in range(0x3B1, 0x3C9)]


def vocab_and_merges(size: int = VOCAB, seed: int = 0) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A BPE vocabulary of ``size`` tokens and the merges that build every multi-character token."""
    tokens = SPECIAL + [f"<unused{i}>" for i in range(UNUSED)] + [f"<0x{b:02X}>" for b in range(256)] + CHARS
    merges = [(a, b) for a in CHARS for b in CHARS]
    pairs = [a + b for a, b in merges]
    rng = random.Random(seed)
    triples: dict[str, tuple[str, str]] = {}
    need = size - len(tokens) - len(pairs)
    while len(triples) < need:
        ab, c = rng.choice(pairs), rng.choice(CHARS)
        triples.setdefault(ab + c, (ab, c))
    vocab = {t: i for i, t in enumerate(tokens + pairs + list(triples))}
    assert len(vocab) == size
    return vocab, merges + list(triples.values())


def tokenizer(size: int = VOCAB):
    from transformers import AddedToken
    from transformers.models.gemma.tokenization_gemma import GemmaTokenizer

    vocab, merges = vocab_and_merges(size)
    tok = GemmaTokenizer(vocab=vocab, merges=merges)
    tok.add_special_tokens({"additional_special_tokens": [
        AddedToken(t, special=True, normalized=False) for t in SPECIAL[5:] + [f"<unused{i}>" for i in range(UNUSED)]]})
    tok.chat_template = ("{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}"
                         "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
    return tok


def model(layers: int = 18, vocab: int = VOCAB, seed: int = 0):
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    cfg = Gemma3TextConfig(vocab_size=vocab, hidden_size=640, intermediate_size=2048, num_hidden_layers=layers,
                           num_attention_heads=4, num_key_value_heads=1, head_dim=256, max_position_embeddings=32768,
                           sliding_window=512, query_pre_attn_scalar=256, tie_word_embeddings=True,
                           pad_token_id=0, eos_token_id=1, bos_token_id=2)
    torch.manual_seed(seed)
    return Gemma3ForCausalLM(cfg).to(torch.bfloat16).eval()


def build(out: Path, layers: int = 18) -> Path:
    """Save the checkpoint and its tokenizer into ``out`` (once: an existing one is kept)."""
    if (out / "config.json").is_file() and (out / "tokenizer.json").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    tokenizer().save_pretrained(out)
    model(layers).save_pretrained(out)
    return out


if __name__ == "__main__":
    layers = int(sys.argv[sys.argv.index("--layers") + 1]) if "--layers" in sys.argv else 18
    print(build(Path(sys.argv[1]), layers))
