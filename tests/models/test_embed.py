"""embed(): transformers' per-text pooling on the same weights, rows in input order, one fetch per block."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from streaming_weights import StreamingBertModel
from streaming_weights.exceptions import ConfigurationError, ModelError
from streaming_weights.models.embedding import MIN_BLOCK_TEXTS, plan_blocks
from tests.support.models import packaged_minilm_dir

NAME = "all-MiniLM-L6-v2"
WORDS = ("the a cat dog sat on mat quickly blue river mountain streaming weights model layer fetch token "
         "server cache encoder sentence vector").split()


def corpus(n: int, seed: int = 0, longest: int = 40) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, longest))) for _ in range(n)]


@pytest.fixture(scope="module")
def reference():
    d = packaged_minilm_dir()
    return AutoModel.from_pretrained(str(d)).eval(), AutoTokenizer.from_pretrained(str(d))


def per_text(reference, texts: list[str], pooling: str) -> torch.Tensor:
    """transformers on each text alone (no padding): mean over its tokens, or its CLS token."""
    model, tok = reference
    rows = []
    with torch.no_grad():
        for t in texts:
            hidden = model(**tok(t, return_tensors="pt")).last_hidden_state[0]
            rows.append(hidden.mean(0) if pooling == "mean" else hidden[0])
    return torch.stack(rows)


def test_plan_blocks_covers_every_text_once_shortest_first():
    lengths = [random.Random(1).randint(1, 300) for _ in range(1000)]
    blocks = plan_blocks(lengths)
    flat = [i for b in blocks for i in b]
    assert sorted(flat) == list(range(1000))
    assert [lengths[i] for i in flat] == sorted(lengths)
    assert all(len(b) >= MIN_BLOCK_TEXTS for b in blocks[:-1])
    assert len(plan_blocks([12] * 256)) == 1  # a short-text corpus is one block
    assert [len(b) for b in plan_blocks([5] * 10, batch_size=4)] == [4, 4, 2]


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_embed_equals_transformers_per_text_in_input_order(minilm_chunks, reference, pooling):
    texts = corpus(24, seed=3)
    want = per_text(reference, texts, pooling)
    with StreamingBertModel(NAME, str(minilm_chunks), cache_size=1) as m:
        got = m.embed(texts, pooling=pooling)
        small = m.embed(texts, pooling=pooling, batch_size=7)
        one = m.embed(texts[5], pooling=pooling)
    assert got.shape == (24, 384) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    torch.testing.assert_close(small, want, rtol=0, atol=1e-5)
    torch.testing.assert_close(one, want[5:6], rtol=0, atol=1e-5)


def test_embed_normalize_and_errors(minilm_chunks, tiny_chunks):
    texts = corpus(10, seed=4)
    with StreamingBertModel(NAME, str(minilm_chunks), cache_size=1) as m:
        raw, unit = m.embed(texts), m.embed(texts, normalize=True)
        assert m.embed([]).shape == (0, 384)
        with pytest.raises(ConfigurationError, match="pooling"):
            m.embed(texts, pooling="median")
        with pytest.raises(ConfigurationError, match="batch_size"):
            m.embed(texts, batch_size=0)
        with pytest.raises(ConfigurationError, match="strings"):
            m.embed(["ok", None])
    torch.testing.assert_close(unit.norm(dim=1), torch.ones(10))
    torch.testing.assert_close(unit, torch.nn.functional.normalize(raw, dim=1))
    _, bert = tiny_chunks("bert")
    with StreamingBertModel("bert", str(bert), cache_size=1) as m, pytest.raises(ModelError, match="tokenizer"):
        m.embed(["no tokenizer in these chunks"])


def test_corpus_with_cache_size_1_fetches_the_streamed_layers_about_once(tiny_source, tmp_path):
    """256 texts, cache of 1 unit: large blocks fetch every streamed layer ~once (small batches: once per batch).
    Fetches are counted, so the tiny BERT with a word-level tokenizer stands in for MiniLM (whose outputs the
    tests above compare with transformers)."""
    from tests.support.tokenizers import text_model

    chunks = text_model(tiny_source("bert"), tmp_path, name="bert-text", vocab_size=300)
    texts = corpus(256, seed=5)
    with StreamingBertModel("bert-text", str(chunks), cache_size=1) as m:
        streamed = sum(u.bytes for u in m.manifest.streamed)
        blocked = m.embed(texts)
        passes = m.get_cache_info()["bytes_fetched"] / streamed
        small = m.embed(texts, batch_size=32)
        small_passes = m.get_cache_info()["bytes_fetched"] / streamed - passes
    print(f"256 texts, cache_size=1: blocks fetch the streamed layers {passes:.2f}x, "
          f"batches of 32: {small_passes:.2f}x")
    torch.testing.assert_close(blocked, small, rtol=0, atol=1e-5)
    assert passes <= 3
    assert small_passes >= 4 * passes
