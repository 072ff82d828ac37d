"""Incremental detokenization: deltas never split a character, add up to the whole text, and respect stop."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi", reason="needs the `api` extra: pip install -e '.[api,dev]'")


from streaming_weights.api.detok import RowText  # noqa: E402
from tests.api.conftest import save_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("tok")
    save_tokenizer(path)
    return AutoTokenizer.from_pretrained(str(path))


def _stream(tok, ids, stop=()):
    row = RowText(tok, tuple(stop))
    deltas = []
    for i in ids:
        deltas.append(row.add([i]))
        if row.stopped:
            break
    deltas.append(row.flush())
    return row, [d for d in deltas if d]


def test_multibyte_characters_are_never_split(tok):
    text = "naïve café 東京 😀 done"
    ids = tok(text)["input_ids"]
    assert len(ids) > len(text.split()), "the test needs characters spread over several tokens"
    row, deltas = _stream(tok, ids)
    assert "".join(deltas) == text == row.text
    assert all("\ufffd" not in d for d in deltas)
    assert len(deltas) > 3  # it really streamed


def test_stop_string_ends_the_text_before_it_and_is_never_sent(tok):
    ids = tok("hello world. bye world")["input_ids"]
    row, deltas = _stream(tok, ids, stop=["world"])
    assert row.stopped and row.text == "hello " and "".join(deltas) == "hello "
    assert all("w" not in d for d in deltas)


def test_partial_stop_prefix_is_released_when_it_does_not_complete(tok):
    ids = tok("a wonderful day")["input_ids"]
    row, deltas = _stream(tok, ids, stop=["world"])
    assert not row.stopped and "".join(deltas) == "a wonderful day"


def test_earliest_of_several_stop_strings_wins(tok):
    ids = tok("one two three four")["input_ids"]
    row, _ = _stream(tok, ids, stop=["four", "two"])
    assert row.text == "one "
