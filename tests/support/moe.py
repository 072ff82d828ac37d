"""Tiny fixed-seed mixture-of-experts checkpoints, saved the way the hub ships them (``save_pretrained``:
per-expert 2-D tensors for most families, fused for gpt-oss), plus GPT-NeoX (``embed_out``), which needs the
same checkpoint conversion. Hidden 32, 2-3 layers, 8 experts of which the router picks 2.

``build(family, path)`` writes one; ``layout="sharded"`` splits it over several safetensors files
(``max_shard_size``), ``layout="bin"`` writes the same hub-layout tensors as a ``pytorch_model.bin``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tests.support.models import SEED

EXPERTS, TOP_K = 8, 2
#: a prompt every tiny model takes (vocabulary 128)
IDS = torch.tensor([[1, 5, 9, 20, 33, 7, 8, 100, 5, 9, 61]])

_BASE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             head_dim=8, vocab_size=128, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2,
             tie_word_embeddings=False)

#: family -> (transformers class, config overrides). The issue names the first five.
FAMILIES: dict[str, tuple[str, dict]] = {
    "mixtral": ("MixtralForCausalLM", dict(num_local_experts=EXPERTS, num_experts_per_tok=TOP_K)),
    "qwen2_moe": ("Qwen2MoeForCausalLM", dict(num_experts=EXPERTS, num_experts_per_tok=TOP_K, moe_intermediate_size=16,
                                               shared_expert_intermediate_size=16, decoder_sparse_step=1)),
    "qwen3_moe": ("Qwen3MoeForCausalLM", dict(num_experts=EXPERTS, num_experts_per_tok=TOP_K, moe_intermediate_size=16,
                                               decoder_sparse_step=1)),
    # MLA attention: num_key_value_heads must equal num_attention_heads; layer 0 dense, grouped routing
    "deepseek_v3": ("DeepseekV3ForCausalLM", dict(num_hidden_layers=3, num_key_value_heads=4, n_routed_experts=EXPERTS,
                                                  num_experts_per_tok=TOP_K, moe_intermediate_size=16,
                                                  first_k_dense_replace=1, n_group=2, topk_group=1, n_shared_experts=1,
                                                  q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8,
                                                  qk_nope_head_dim=8, v_head_dim=8, head_dim=8)),
    "gpt_oss": ("GptOssForCausalLM", dict(num_local_experts=EXPERTS, num_experts_per_tok=TOP_K, intermediate_size=32)),
    # families issue 25 does not name
    "olmoe": ("OlmoeForCausalLM", dict(num_experts=EXPERTS, num_experts_per_tok=TOP_K)),
    "glm4_moe": ("Glm4MoeForCausalLM", dict(n_routed_experts=EXPERTS, num_experts_per_tok=TOP_K,
                                            moe_intermediate_size=16, first_k_dense_replace=1, n_group=1, topk_group=1,
                                            n_shared_experts=1)),
    "ernie4_5_moe": ("Ernie4_5_MoeForCausalLM", dict(moe_num_experts=EXPERTS, moe_k=TOP_K, moe_intermediate_size=16,
                                                     moe_layer_start_index=0, moe_num_shared_experts=0)),
    "hunyuan_v1_moe": ("HunYuanMoEV1ForCausalLM", dict(num_experts=EXPERTS, moe_topk=TOP_K, moe_intermediate_size=16,
                                                       num_shared_expert=1)),
    "gpt_neox": ("GPTNeoXForCausalLM", dict(rotary_pct=0.5)),
}
NAMED = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "gpt_oss")


def config(family: str, **overrides):
    from transformers import AutoConfig

    _, extra = FAMILIES[family]
    return AutoConfig.for_model(family, **{**_BASE, **extra, **overrides})


def build(family: str, path: Path, *, layout: str = "single", **overrides) -> Path:
    """Save a random-init ``family`` model (fixed seed) at ``path`` in the hub layout; returns ``path``.

    ``layout``: ``"single"`` (one ``model.safetensors``), ``"sharded"`` (several files and an index) or
    ``"bin"`` (``pytorch_model.bin``, read with ``weights_only=True``).
    """
    import transformers

    torch.manual_seed(SEED)
    cls = getattr(transformers, FAMILIES[family][0])
    model = cls(config(family, **overrides)).eval()
    if layout == "sharded":
        model.save_pretrained(str(path), max_shard_size="60KB")
        assert len(list(path.glob("*.safetensors"))) > 1, "the sharded variant must span several files"
    elif layout == "bin":  # transformers 5 always writes safetensors: keep its hub layout, store it pickled
        model.save_pretrained(str(path))
        from safetensors.torch import load_file

        torch.save(load_file(str(path / "model.safetensors")), str(path / "pytorch_model.bin"))
        (path / "model.safetensors").unlink()
    else:
        model.save_pretrained(str(path))
    return path


def reference(path: Path, experts_implementation: str | None = None):
    """transformers' own model loaded from ``path`` (fp32, eval), with ``experts_implementation`` if given."""
    from transformers import AutoModelForCausalLM

    kw = {"experts_implementation": experts_implementation} if experts_implementation else {}
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, **kw).eval()
    if experts_implementation:
        assert model.config._experts_implementation == experts_implementation, model.config._experts_implementation
    return model


def implementations() -> list[str]:
    """The experts implementations transformers registers that run on this CPU ("eager" first)."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    names = ["eager", *sorted(ALL_EXPERTS_FUNCTIONS.keys())]
    return [n for n in names if n in ("eager", "grouped_mm", "batched_mm")]


def set_implementation(model, name: str) -> None:
    """Switch a (transformers or streamed ``hf_model``) model's experts forward to ``name``."""
    model.set_experts_implementation(name)
    assert model.config._experts_implementation == name, (name, model.config._experts_implementation)


def expert_parents(model, experts: int = EXPERTS) -> list[str]:
    """Paths of the modules whose own parameters are fused expert tensors (3-D, ``experts`` rows): read off the
    transformers model, independently of the library's own detection."""
    out = []
    for path, module in model.named_modules():
        params = list(module.parameters(recurse=False))
        if params and any(p.dim() == 3 and p.shape[0] == experts for p in params):
            out.append(path)
    return out


def manifest_of(chunks: Path):
    from streaming_weights.format import Manifest

    return Manifest.from_bytes((chunks / "manifest.json").read_bytes())


def routed_run(chunks, family: str, ids, new: int) -> tuple[list, list[str]]:
    """Generate ``new`` tokens with no cache at all (every expert use is a fetch) from a source that records its
    fetches; returns ``(calls, fetched)``: per experts-module call ``(path, tokens, router's experts,
    expert units fetched during the call)``, and every unit fetched."""
    from streaming_weights import StreamingBaseModel
    from tests.support.streaming import DelayedSource

    source = DelayedSource(chunks, delay=0)
    names = {u.name for u in manifest_of(chunks).experts}
    calls: list = []

    def record(path):
        def hook(module, args, kwargs):
            index = next((kwargs[k] for k in ("top_k_index", "router_indices") if k in kwargs), None)
            index = args[1] if index is None else index
            hidden = args[0] if args else kwargs["hidden_states"]
            picked = sorted({int(e) for e in index.flatten().tolist() if 0 <= e < EXPERTS})
            calls.append((path, hidden.reshape(-1, hidden.shape[-1]).shape[0], picked, len(source.fetched)))
        return hook

    with StreamingBaseModel(family, source, cache_size=0, prefetch_count=0, speculation="off") as m:
        for path in expert_parents(m.hf_model):  # runs before the library's own hook
            m.hf_model.get_submodule(path).register_forward_pre_hook(record(path), with_kwargs=True, prepend=True)
        m.generate(input_ids=ids, max_new_tokens=new, do_sample=False)
    ends = [c[3] for c in calls[1:]] + [len(source.fetched)]
    out = [(p, n, picked, {f for f in source.fetched[start:end] if f in names})
           for (p, n, picked, start), end in zip(calls, ends)]
    return out, source.fetched
