"""Models the benchmarks run on: random-init checkpoints, chunked copies, re-exported HF directories."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from typing import Any


def build_random_llama(path: Path, *, layers: int, hidden: int, intermediate: int, vocab: int,
                       heads: int = 4, kv_heads: int = 2, seed: int = 1234) -> Path:
    """Save a random-init LlamaForCausalLM checkpoint (safetensors) to ``path``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      max_position_embeddings=512, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1,
                      eos_token_id=2)
    LlamaForCausalLM(cfg).eval().save_pretrained(str(path), safe_serialization=True)
    return path


def chunk_source(source: str | Path, out: Path, name: str, **options: Any) -> Path:
    """Chunk ``source`` into the directory ``out`` (model name ``name``; ``options``: more
    :class:`~streaming_weights.chunker.ModelChunker` keywords); returns ``out``."""
    from ..chunker import ModelChunker

    asyncio.run(ModelChunker(str(source), output_dir=str(out), name=name, force=True, **options).chunk_model())
    return out


def load_manifest(chunks_dir: Path) -> Any:
    from ..format import MANIFEST_FILE, Manifest

    return Manifest.from_bytes((Path(chunks_dir) / MANIFEST_FILE).read_bytes())


def export_hf_dir(chunks_dir: Path, out: Path) -> Path:
    """Reassemble a chunked model as a transformers directory (one safetensors file + config + files),
    the "full checkpoint" the peers load. Tied aliases are not stored; the config re-ties them."""
    from safetensors.torch import load_file, save_file

    from ..models.architecture import build_config

    import torch

    m = load_manifest(chunks_dir)
    out.mkdir(parents=True, exist_ok=True)
    state: dict[str, Any] = {}
    shards: dict[str, list[Any]] = {}
    for u in sorted(m.units, key=lambda u: u.rows or (0, 0)):  # a tensor's row shards in row order
        for name, t in load_file(str(Path(chunks_dir) / u.path)).items():
            (shards.setdefault(name, []).append(t) if u.role == "shard" else state.__setitem__(name, t))
    state.update({name: torch.cat(parts) for name, parts in shards.items()})
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    del state
    cfg = build_config(m.model_type, m.config)
    cfg.architectures = [m.architecture]
    cfg.save_pretrained(str(out))
    for f in m.files:
        if f.name != "config.json":
            shutil.copyfile(Path(chunks_dir) / f.path, out / f.name)
    return out


def write_one_unit_model(d: Path, unit_bytes: int) -> Any:
    """A chunk directory whose only streamed unit ``big`` holds ``unit_bytes`` of float32 data (through the
    one manifest writer, :func:`streaming_weights.format.builder.write_model`); returns its manifest."""
    import torch

    from ..format.builder import write_model
    from ..storage import FilesystemBackend

    def tensors(name: str, size: int) -> dict[str, Any]:
        n = max(2, size // 4)
        return {f"{name}.weight": torch.arange(n, dtype=torch.float32).remainder_(977.0)}

    d.mkdir(parents=True, exist_ok=True)
    units = {"resident": tensors("resident", 4096), "big": tensors("big", unit_bytes)}
    return asyncio.run(write_model(FilesystemBackend(str(d)), name="bench-transfer", units=units,
                                   architecture="BenchArch", model_type="bench", config={}, dtype="float32",
                                   force=True))


GROUNDED_TEXT = ("The weight server keeps every unit of the model in its memory cache and sends each one as raw "
                 "binary frames. The client verifies the BLAKE3 digest of every unit before it decodes the "
                 "tensors without a copy, and it keeps only a few layers at a time.")


#: Tokens the perplexity is measured on (one forward pass): the quant case's int8 goal is a 1% rise, which a
#: paragraph of ~80 tokens cannot resolve (measured: the int8-channel kernel over bfloat16 was 1.0033x on the
#: earlier 81-token paragraph, 1.0017x on these 1024 tokens).
PERPLEXITY_TOKENS = 1024


def perplexity_text() -> str:
    """Python's own documentation topics (``pydoc_data``, shipped with CPython) in sorted order: English prose
    with code examples, the same on every machine with this Python, nothing downloaded."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def perplexity_ids(hf_dir: Path, tokens: int = PERPLEXITY_TOKENS) -> list[int] | None:
    """The first ``tokens`` tokens of :func:`perplexity_text` through the model's tokenizer (no chat template);
    None without a tokenizer."""
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(hf_dir), local_files_only=True)
        return [int(i) for i in tok(perplexity_text())["input_ids"][:tokens]]
    except Exception:  # noqa: BLE001 - no (usable) tokenizer: tiny random-init models
        return None


def grounded_prompt(hf_dir: Path, vocab: int) -> tuple[list[int], str]:
    """(prompt ids, description): an input-grounded prompt (repeat a paragraph) through the model's chat
    template when ``hf_dir`` has a tokenizer; else a fixed random prompt whose second half repeats its
    first (tiny test models have no tokenizer)."""
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(hf_dir), local_files_only=True)
        msgs = [{"role": "user", "content": "Repeat the following text exactly, word for word.\n\n" + GROUNDED_TEXT}]
        ids = tok.apply_chat_template(msgs, add_generation_prompt=True)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        return [int(i) for i in ids], "chat-templated 'repeat this paragraph', input-grounded"
    except Exception:  # noqa: BLE001 - no (usable) tokenizer: tiny random-init models
        from .common import prompt_ids

        half = prompt_ids(vocab, 16)[0].tolist()
        return half + half, "random ids, second half repeating the first (no tokenizer)"
