"""Speculation (prompt lookup, assistant models), generate_text: same tokens as plain greedy, fewer fetches."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from streaming_weights import StreamingConfig, StreamingLlamaModel
from streaming_weights.exceptions import ConfigurationError, ModelError
from streaming_weights.models.generation import (
    AUTO_DRAFT_TOKENS,
    decode_new_text,
    lookup_draft_length,
    parse_speculation,
    prepare_generate,
)

# A repeating prompt: the tiny random model's greedy continuation loops, so prompt lookup finds drafts.
LOOP_IDS = torch.tensor([[5, 17, 33, 9, 41, 7, 5, 17, 33, 9, 41, 7, 5, 17]])


@pytest.fixture(scope="module")
def tiny(tiny_chunks):
    src, chunks = tiny_chunks("llama", layers=6)
    ref = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
    return chunks, ref


def fetched(m) -> int:
    return m.get_cache_info()["bytes_fetched"]


def test_parse_speculation():
    assert parse_speculation(None) == "auto"
    assert parse_speculation("AUTO") == "auto"
    assert parse_speculation("off") == parse_speculation(0) == parse_speculation("0") == "off"
    assert parse_speculation("12") == parse_speculation(12) == 12
    for bad in ("fast", -1, "-3", 2.5, True):
        with pytest.raises(ConfigurationError, match="speculation"):
            parse_speculation(bad)


def test_auto_applies_only_where_it_cannot_change_the_result(tiny):
    _, ref = tiny
    one, two = LOOP_IDS, LOOP_IDS.repeat(2, 1)
    assert lookup_draft_length(ref, (), {"input_ids": one}, "auto") == AUTO_DRAFT_TOKENS >= 8
    assert lookup_draft_length(ref, (one,), {}, 16) == 16
    assert lookup_draft_length(ref, (), {"input_ids": one}, "off") is None
    assert lookup_draft_length(ref, (), {"input_ids": two}, "auto") is None  # batches decode plainly
    assert lookup_draft_length(ref, (), {"input_ids": two}, 8) is None
    assert lookup_draft_length(ref, (), {"input_ids": one, "do_sample": True}, "auto") is None
    assert lookup_draft_length(ref, (), {"input_ids": one, "num_beams": 2}, "auto") is None
    assert lookup_draft_length(ref, (), {"input_ids": one, "num_return_sequences": 2}, "auto") is None
    assert lookup_draft_length(ref, (), {"input_ids": one, "prompt_lookup_num_tokens": 3}, "auto") is None
    kw = prepare_generate(ref, (), {"input_ids": one, "max_new_tokens": 3}, "auto")
    assert kw == {"input_ids": one, "max_new_tokens": 3, "prompt_lookup_num_tokens": AUTO_DRAFT_TOKENS}
    with pytest.raises(ConfigurationError):
        prepare_generate(ref, (), {"input_ids": one}, "sometimes")


@pytest.mark.parametrize("speculation", ["off", "auto", 4])
def test_speculation_keeps_greedy_tokens_and_counts_drafts(tiny, speculation):
    chunks, ref = tiny
    with torch.no_grad():
        want = ref.generate(input_ids=LOOP_IDS, max_new_tokens=24, do_sample=False)
    with StreamingLlamaModel("llama", str(chunks), cache_size=1) as m:
        got = m.generate(input_ids=LOOP_IDS, max_new_tokens=24, do_sample=False, speculation=speculation)
        stats = m.get_inference_stats()
    assert torch.equal(got, want)
    if speculation == "off":
        assert stats["drafted_tokens"] == stats["accepted_tokens"] == 0
    else:
        assert 0 < stats["accepted_tokens"] <= stats["drafted_tokens"]
        print(f"speculation={speculation}: drafted {stats['drafted_tokens']}, accepted {stats['accepted_tokens']}")


def test_speculation_saves_fetches_and_falls_back_for_batches(tiny):
    chunks, ref = tiny
    with StreamingLlamaModel("llama", str(chunks), cache_size=1) as m:
        per_setting = {}
        for spec in ("off", "auto"):
            before = fetched(m)
            m.generate(input_ids=LOOP_IDS, max_new_tokens=24, do_sample=False, speculation=spec)
            per_setting[spec] = fetched(m) - before
        drafted = m.get_inference_stats()["drafted_tokens"]
        batch = LOOP_IDS.repeat(2, 1)
        got = m.generate(input_ids=batch, max_new_tokens=6, do_sample=False)  # default "auto": plain here
        assert m.get_inference_stats()["drafted_tokens"] == drafted
    with torch.no_grad():
        assert torch.equal(got, ref.generate(input_ids=batch, max_new_tokens=6, do_sample=False))
    print(f"bytes: off {per_setting['off']}, auto {per_setting['auto']}")
    assert per_setting["auto"] < per_setting["off"] / 2


def test_speculation_from_config_and_environment(tiny, monkeypatch):
    chunks, _ = tiny
    monkeypatch.setenv("SURFING_SPECULATION", "off")
    assert StreamingConfig.from_env().speculation == "off"
    for kw in ({}, {"config": StreamingConfig(speculation="off")}, {"speculation": "off"}):
        with StreamingLlamaModel("llama", str(chunks), cache_size=1, **kw) as m:
            m.generate(input_ids=LOOP_IDS, max_new_tokens=8, do_sample=False)
            assert m.get_inference_stats()["drafted_tokens"] == 0
    monkeypatch.setenv("SURFING_SPECULATION", "3")
    with StreamingLlamaModel("llama", str(chunks), cache_size=1) as m:
        m.generate(input_ids=LOOP_IDS, max_new_tokens=8, do_sample=False)
        assert m.get_inference_stats()["drafted_tokens"] > 0
        with pytest.raises(ConfigurationError, match="speculation"):
            m.generate(input_ids=LOOP_IDS, max_new_tokens=2, speculation="sometimes")


def test_assistant_model_transformers_or_streaming_keeps_greedy_tokens(tiny, tiny_chunks):
    chunks, ref = tiny
    draft_src, draft_chunks = tiny_chunks("llama", layers=2)  # same vocabulary, other (random) weights
    draft_ref = AutoModelForCausalLM.from_pretrained(str(draft_src), dtype=torch.float32).eval()
    with torch.no_grad():
        want = ref.generate(input_ids=LOOP_IDS, max_new_tokens=16, do_sample=False)
    with StreamingLlamaModel("llama", str(chunks), cache_size=1) as m, \
            StreamingLlamaModel("llama", str(draft_chunks), cache_size=1) as draft:
        for assistant in (draft_ref, draft):
            before = m.get_inference_stats()["drafted_tokens"]
            got = m.generate(input_ids=LOOP_IDS, max_new_tokens=16, do_sample=False, assistant_model=assistant)
            assert torch.equal(got, want), type(assistant).__name__
            assert m.get_inference_stats()["drafted_tokens"] > before  # the draft model did propose tokens
        assert draft.get_inference_stats()["total_inferences"] > 0  # the streamed draft really ran


def test_generate_text_needs_a_tokenizer_and_string_prompts(tiny, llama_text_chunks):
    chunks, _ = tiny
    with StreamingLlamaModel("llama", str(chunks), cache_size=1) as m:  # tiny chunks carry no tokenizer
        with pytest.raises(ModelError, match="tokenizer"):
            m.generate_text("hi")
    with StreamingLlamaModel("llama-text", str(llama_text_chunks), cache_size=1) as m:  # the tiny one with a tokenizer
        with pytest.raises(ConfigurationError, match="strings"):
            m.generate_text(["ok", 3])
        with pytest.raises(ConfigurationError, match="batch_size"):
            m.generate_text(["ok"], batch_size=0)


class CharTokenizer:
    """decode() joins characters; id 0 is special (EOS)."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join("" if (i == 0 and skip_special_tokens) else chr(i) for i in ids)


def test_decoding_rule_stops_at_eos_and_stop_strings_without_stripping():
    tok = CharTokenizer()
    ids = [ord(c) for c in " Hello.\n\nBye"] + [0] + [ord("x")]
    assert decode_new_text(tok, ids, {0}) == " Hello.\n\nBye"
    assert decode_new_text(tok, ids, {0}, ["\n\n"]) == " Hello."
    assert decode_new_text(tok, ids, {0}, ["Bye", "llo"]) == " He"
    assert decode_new_text(tok, ids, {0}, ["x"]) == " Hello.\n\nBye"  # after EOS: never reached
    assert decode_new_text(tok, [0], {0}) == ""


PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "Name three primary colors.",
           "How many legs does a spider have?", "Explain photosynthesis in one sentence.", "What is 12 times 7?",
           "Give me a synonym for happy.", "Who wrote Romeo and Juliet?"]


@pytest.mark.slow  # 8 x 6 one-prompt steps plus a batch: minutes on a shared 2-core runner
def test_generate_text_batch_equals_single_calls_for_a_quarter_of_the_bytes(smollm2_chunks):
    """8 prompts in one left-padded batch vs 8 one-prompt calls (default settings each): identical texts,
    and since every forward fetches the streamed layers once, under 1/4 of the bytes per token."""
    new = 6
    # 20 of 30 layers cached: each forward fetches the other 10 (the ratio is that of forward passes).
    with StreamingLlamaModel("SmolLM2-135M-Instruct", str(smollm2_chunks), cache_size=20) as m:
        before = fetched(m)
        batched = m.generate_text(PROMPTS, chat=True, max_new_tokens=new, min_new_tokens=new, do_sample=False)
        batch_bytes = fetched(m) - before
        singles = []
        for p in PROMPTS:
            singles.append(m.generate_text(p, chat=True, max_new_tokens=new, min_new_tokens=new, do_sample=False))
        single_bytes = fetched(m) - before - batch_bytes
        assert m.generate_text([]) == []
    flips = [(p, a, b) for p, a, b in zip(PROMPTS, batched, singles) if a != b]
    for p, a, b in flips:  # shown, never hidden: a left-padding near-tie would flip a token here
        print(f"DIFFERS for {p!r}: batched {a!r} vs single {b!r}")
    print(f"batched {batch_bytes / 2**20:.0f} MiB vs singles {single_bytes / 2**20:.0f} MiB for {8 * new} tokens "
          f"({batch_bytes / single_bytes:.3f}x)")
    assert not flips
    assert all(isinstance(t, str) and t for t in batched)
    assert batch_bytes < single_bytes / 4


def test_generate_text_stop_strings_and_shapes(smollm2_chunks):
    # SmolLM2: transformers' stop-string matcher needs a subword vocabulary (the tiny word-level one fails it)
    with StreamingLlamaModel("SmolLM2-135M-Instruct", str(smollm2_chunks), cache_size=30) as m:
        full = m.generate_text("The capital of France is", max_new_tokens=12, do_sample=False)
        assert isinstance(full, str) and full == m.generate_text(["The capital of France is"], max_new_tokens=12,
                                                                  do_sample=False)[0]
        word = full.split()[1]  # a word inside the continuation
        stopped = m.generate_text(["The capital of France is"], stop=[word], max_new_tokens=12, do_sample=False)
    assert stopped == [full[:full.index(word)]]


EIFFEL = ("The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It is named after "
          "the engineer Gustave Eiffel, whose company designed and built the tower from 1887 to 1889.")


@pytest.mark.parametrize("prompt, new, bound", [
    pytest.param("Repeat this text exactly:\n\n" + EIFFEL, 32, 0.4,  # input-grounded: drafts get accepted
                 marks=pytest.mark.slow),  # 32 plain steps for the "off" baseline
    ("Write a short poem about autumn.", 12, 1.0),        # open-ended: "auto" must never cost more than "off"
], ids=["grounded", "open-ended"])
def test_smollm2_default_speculation_bytes(smollm2_chunks, prompt, new, bound):
    # 20 of 30 layers cached: each forward fetches the other 10 (the ratio is that of forward passes).
    with StreamingLlamaModel("SmolLM2-135M-Instruct", str(smollm2_chunks), cache_size=20) as m:
        enc = m.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                              return_tensors="pt", return_dict=True)
        cost, out = {}, {}
        for spec in ("off", None):  # None: the default ("auto")
            before = fetched(m)
            out[spec] = m.generate(**enc, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                   speculation=spec)
            cost[spec] = fetched(m) - before
        stats = m.get_inference_stats()
    ratio = cost[None] / cost["off"]
    print(f"auto/off bytes {ratio:.3f} ({cost[None] / 2**20:.0f} vs {cost['off'] / 2**20:.0f} MiB for {new} "
          f"tokens); drafted {stats['drafted_tokens']}, accepted {stats['accepted_tokens']}")
    if not torch.equal(out[None], out["off"]):  # a near-tie flipped by k-token verification: show it
        n = enc["input_ids"].shape[1]
        pytest.fail(f"tokens differ: auto {out[None][0, n:].tolist()} vs off {out['off'][0, n:].tolist()}")
    assert ratio <= bound
