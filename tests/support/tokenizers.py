"""A small word-level tokenizer with a chat template, saved beside a tiny checkpoint so text commands
(``generate --prompt``, ``chat``, ``embed --text``) run on the tiny fixed-seed models, not only SmolLM2."""

from __future__ import annotations

from pathlib import Path

#: A ChatML-style template (the shape SmolLM2's has), over the special tokens below.
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|> {% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}")
#: The same, except that earlier answers are rendered by their first two words only (as templates that drop
#: an answer's reasoning do): the next prompt shares less with the KV cache than the tokens it computed.
SHORT_HISTORY_TEMPLATE = CHAT_TEMPLATE.replace(
    "{{ m['content'] }}",
    "{% if m['role'] == 'assistant' %}{{ m['content'].split(' ')[:2] | join(' ') }}{% else %}{{ m['content'] }}"
    "{% endif %}")
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>"]
WORDS = ("system user assistant the a of and is what capital france germany italy spain paris berlin hello hi "
         "tell me story answer one short sentence why how who where when name city country").split()


def add_tokenizer(model_dir: Path, *, vocab_size: int, bos: bool = False, chat: str | None = CHAT_TEMPLATE) -> Path:
    """Write ``tokenizer.json`` + ``tokenizer_config.json`` into ``model_dir`` (ids < ``vocab_size``).

    Ids 0-5 are ``<pad> <s> </s> <unk> <|im_start|> <|im_end|>`` (the tiny models use pad 0, bos 1, eos 2),
    then :data:`WORDS`, then ``w<N>`` fillers so every id the model can emit decodes to a word. ``bos``: the
    tokenizer prepends ``<s>`` (so an empty prompt still encodes to one token); ``chat``: the chat template
    (``None``: none).
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate([*SPECIALS, *WORDS])}
    vocab.update({f"w{i}": i for i in range(len(vocab), vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(SPECIALS)
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", chat_template=chat)
    fast.save_pretrained(str(model_dir))
    return model_dir


def text_model(source: Path, out: Path, *, name: str, vocab_size: int, bos: bool = False,
               chat: str | None = CHAT_TEMPLATE) -> Path:
    """Copy the tiny checkpoint ``source`` to ``out/src`` with a tokenizer added, chunk it into ``out/chunks``
    as ``name``; returns the chunk directory.

    For references: ``out/src`` is the checkpoint transformers loads; ``out/tokenizer`` holds the tokenizer
    files alone (load the reference tokenizer from there: beside a ``config.json`` AutoTokenizer would pick
    the architecture's own tokenizer class, while a streaming client sees only the tokenizer files).
    """
    import shutil

    from tests.support.models import chunk

    add_tokenizer(out / "tokenizer", vocab_size=vocab_size, bos=bos, chat=chat)
    src = out / "src"
    shutil.copytree(source, src)
    for f in (out / "tokenizer").iterdir():
        shutil.copy(f, src / f.name)
    chunk(src, out / "chunks", name=name)
    return out / "chunks"
