"""The seed-named model classes: one family each, same engine. Outputs are what transformers' base
classes return (``LlamaModel``, ``BertModel``, ``T5Model``, ``GPT2Model``); ``generate`` is the
``*ForCausalLM`` / ``*ForConditionalGeneration`` one."""

from __future__ import annotations

from typing import Any

from .base import StreamingBaseModel


class StreamingLlamaModel(StreamingBaseModel):
    """LLaMA family (Llama, Mistral, Qwen2/3 GQA, Gemma, Phi-3…)."""

    families = frozenset({"llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma",
                          "gemma2", "phi3", "olmo", "olmo2", "granite", "stablelm", "starcoder2", "smollm3"})


class StreamingBertModel(StreamingBaseModel):
    """BERT family; returns ``last_hidden_state`` and ``pooler_output``; ``token_type_ids`` accepted."""

    families = frozenset({"bert", "roberta", "xlm-roberta", "electra", "camembert", "ernie"})


class StreamingGPTModel(StreamingBaseModel):
    """GPT-2 family (GPT-2, GPT-Neo, GPT-J, GPT-NeoX, BigCode)."""

    families = frozenset({"gpt2", "gpt_neo", "gptj", "gpt_neox", "gpt_bigcode"})


class StreamingT5Model(StreamingBaseModel):
    """T5 family (encoder-decoder). ``forward`` returns what ``T5Model`` returns; ``generate`` runs the
    encoder once per call and the decoder per token, as ``T5ForConditionalGeneration`` does."""

    families = frozenset({"t5", "mt5", "umt5"})

    def _forward_impl(self, **kwargs: Any) -> Any:
        from transformers import MODEL_MAPPING

        base_cls = MODEL_MAPPING[type(self.hf_model.config)]  # T5Model / MT5Model / UMT5Model
        if isinstance(self.hf_model, base_cls):
            return self.hf_model(**kwargs)
        # T5Model.forward only touches encoder/decoder/config, which the *ForConditionalGeneration model
        # shares: run transformers' own T5Model code over the streamed modules.
        return base_cls.forward(self.hf_model, **kwargs)
