"""The tokenizer is built when text is first used: callers that pass token ids never pay for it, and under a
memory budget the kept units make room for it when it is built."""

from __future__ import annotations

import asyncio

import pytest
import torch

from streaming_weights import StreamingBaseModel
from streaming_weights.exceptions import ConfigurationError
from streaming_weights.models import tokenizer as lazy

IDS = torch.tensor([[5, 17, 33, 2, 9]])


@pytest.fixture
def builds(monkeypatch):
    """Counts tokenizer builds (transformers' AutoTokenizer.from_pretrained, which the lazy tokenizer calls)."""
    from transformers import AutoTokenizer

    calls = []
    real = AutoTokenizer.from_pretrained.__func__

    def counting(cls, *a, **kw):
        calls.append(a[0] if a else kw)
        return real(cls, *a, **kw)

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", classmethod(counting))
    return calls


def test_token_ids_only_never_build_a_tokenizer(llama_text_chunks, builds):
    with StreamingBaseModel(None, llama_text_chunks, speculation="off") as m:
        m.generate(input_ids=IDS, max_new_tokens=3, do_sample=False)
        m.forward(IDS)
        assert builds == []
        assert not m._loaded.lazy_tokenizer.built
        assert m._loaded.lazy_tokenizer.directory.is_dir()  # the files wait on disk, not in memory


def test_text_builds_it_once_and_gives_what_the_ids_give(llama_text_chunks, builds):
    with StreamingBaseModel(None, llama_text_chunks, speculation="off") as m:
        directory = m._loaded.lazy_tokenizer.directory
        text = m.generate_text("what is the capital of france", max_new_tokens=4, do_sample=False)
        assert len(builds) == 1 and not directory.exists()  # built once; its files are gone then
        tok = m.tokenizer
        assert tok is m.tokenizer and len(builds) == 1
        ids = torch.tensor([tok("what is the capital of france")["input_ids"]])
        out = m.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
        assert text == tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_built_inside_a_running_event_loop(llama_text_chunks):
    async def main():
        async with StreamingBaseModel(None, llama_text_chunks) as m:
            return m.tokenizer("hello world")["input_ids"]  # nothing to fetch: it builds from the copied files

    assert len(asyncio.run(main())) == 2


def test_unbuilt_files_are_removed_when_the_model_goes(llama_text_chunks):
    m = StreamingBaseModel(None, llama_text_chunks)
    directory = m._loaded.lazy_tokenizer.directory
    m.close()
    del m
    import gc

    gc.collect()
    assert not directory.exists()


def test_its_cost_is_reported_first_as_the_parse_estimate_then_as_measured(llama_text_chunks):
    with StreamingBaseModel(None, llama_text_chunks) as m:
        files = m._loaded.lazy_tokenizer.directory
        size = sum(f.stat().st_size for f in files.iterdir())
        told = []
        tok = lazy.LazyTokenizer(files, "x", told.append)
        m._loaded.lazy_tokenizer._cleanup.detach()  # the new holder owns the directory now
        tok.get()
        assert told[0] == lazy.PARSE_PEAK_PER_FILE_BYTE * size > 0
        assert len(told) == 2 and told[0] + told[1] >= 0  # the estimate is replaced by what it holds


def test_a_budget_makes_room_for_it(llama_text_chunks):
    with StreamingBaseModel(None, llama_text_chunks, memory_budget="2GB") as m:
        engine = m.engine
        n, plan = len(m.streamed_units), engine.plan
        assert engine.cache.max_units == plan.cache_size == n  # the whole model fits
        extra = plan.budget_bytes - plan.bound_bytes + 2 * plan.unit_bytes  # two units more than the slack
        engine.add_overhead(extra)
        assert engine.plan.overhead_bytes == plan.overhead_bytes + extra
        assert engine.cache.max_units == engine.plan.cache_size < n
        engine.add_overhead(-extra)  # given back: the kept units grow again
        assert engine.cache.max_units == engine.plan.cache_size == n
        before = engine.plan
        with pytest.raises(ConfigurationError, match="below the minimum"):
            engine.add_overhead(plan.budget_bytes)  # nothing fits beside it: refused, nothing counted
        assert engine.plan == before
        tokens = m.generate(input_ids=IDS, max_new_tokens=3, do_sample=False)
        assert tokens.shape == (1, IDS.shape[1] + 3)


def test_a_streaming_draft_of_the_same_vocabulary_builds_no_tokenizer(llama_text_chunks, builds):
    with StreamingBaseModel(None, llama_text_chunks) as m, StreamingBaseModel(None, llama_text_chunks) as draft:
        want = m.generate(input_ids=IDS, max_new_tokens=4, do_sample=False, speculation="off")
        got = m.generate(input_ids=IDS, max_new_tokens=4, do_sample=False, assistant_model=draft)
        assert torch.equal(got, want)
        assert builds == [] and not draft._loaded.lazy_tokenizer.built


def test_still_built_after_the_model_is_closed(llama_text_chunks):
    m = StreamingBaseModel(None, llama_text_chunks, memory_budget="2GB")
    m.close()

    def refuse(extra):
        raise AssertionError("a closed model has no cache to make room in")

    m.engine.add_overhead = refuse
    assert m.tokenizer("hello world")["input_ids"]  # from the copied files
