"""ChatSession (behind ``surfing chat``): reusing the KV cache across turns gives the answer a fresh
generate over the whole conversation gives."""

from __future__ import annotations

import torch

from streaming_weights import StreamingLlamaModel
from streaming_weights.chat import ChatSession, common_prefix_length


def test_common_prefix_length():
    a = torch.tensor([1, 2, 3, 4])
    assert common_prefix_length(a, torch.tensor([1, 2, 9])) == 2
    assert common_prefix_length(a, torch.tensor([1, 2, 3, 4, 5])) == 4
    assert common_prefix_length(a, torch.tensor([7])) == 0


def test_second_turn_with_the_cache_equals_a_fresh_generate(smollm2_chunks):
    with StreamingLlamaModel(None, str(smollm2_chunks), 30) as model:
        session = ChatSession(model, system="Answer in one short sentence.", max_new_tokens=10)
        session.reply("What is the capital of France?")
        answer, stats = session.reply("And the capital of Germany?")
        assert stats.reused_tokens > 20 and stats.computed_tokens < stats.reused_tokens

        tok = model.tokenizer
        ids = tok.apply_chat_template(session.messages[:-1], add_generation_prompt=True, return_tensors="pt",
                                      return_dict=True)["input_ids"]
        fresh = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=10,
                               do_sample=False)
        assert answer == tok.decode(fresh[0, ids.shape[-1]:], skip_special_tokens=True)
