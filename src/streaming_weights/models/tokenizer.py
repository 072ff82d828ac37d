"""The model's tokenizer, built when text is first used: callers that pass token ids never pay for it.

Building a tokenizer is the largest cost of a model besides its weights (SmolLM2's parse of ``tokenizer.json``
peaks at ~45 MiB and keeps ~16 MiB; a 262k-token vocabulary keeps far more), so loading only copies the chunks'
tokenizer files into a private directory on disk (no memory held) and :class:`LazyTokenizer` builds the
tokenizer from it on first use, from any thread (inside an event loop too: nothing is fetched then).

Under a memory budget its cost is counted when it is built: before parsing, the kept units make room for the
parse's estimated peak (:data:`PARSE_PEAK_PER_FILE_BYTE` x the files' size); after it, the anonymous memory the
tokenizer really holds replaces that estimate in the plan (``on_cost``, the engine's ``add_overhead``).
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import weakref
from pathlib import Path
from typing import Any, Callable

from ..exceptions import ConfigurationError, ModelError
from ..memory import current_anon, release_free_heap

TOKENIZER_FILES = frozenset({"tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model",
                             "spiece.model", "sentencepiece.bpe.model"})
#: peak anonymous memory of parsing a tokenizer per byte of its files, rounded up from measurements
#: (SmolLM2: 3.4 MB of files, ~45 MiB peak; a 262k-token BPE: 19 MB, ~281 MiB peak)
PARSE_PEAK_PER_FILE_BYTE = 16
_UNBUILT = object()


class LazyTokenizer:
    """Builds ``AutoTokenizer.from_pretrained(directory)`` once, on the first :meth:`get`.

    Args:
        directory: the tokenizer files (owned: removed once built, or when this object goes away).
        name: the model's name, for errors.
        on_cost: told the bytes the tokenizer adds (first an estimate of the parse's peak, then the difference to
            what it really holds, which may be negative); may raise to refuse (the budget cannot hold it).
    """

    def __init__(self, directory: Path, name: str, on_cost: Callable[[int], Any] | None = None) -> None:
        self.directory = directory
        self.name = name
        self.on_cost = on_cost
        self._value: Any = _UNBUILT
        self._lock = threading.Lock()
        self._cleanup = weakref.finalize(self, shutil.rmtree, str(directory), True)

    @property
    def built(self) -> bool:
        return self._value is not _UNBUILT

    def get(self) -> Any:
        """The tokenizer (built now if it was not).

        Raises:
            ModelError: the files do not make a tokenizer.
            ConfigurationError: the memory budget cannot hold it (from ``on_cost``).
        """
        if self._value is _UNBUILT:
            with self._lock:
                if self._value is _UNBUILT:
                    self._value = self._build()
                    self._cleanup()
        return self._value

    def _build(self) -> Any:
        from transformers import AutoTokenizer  # the code first: imported code is the process's, not the model's

        estimate = PARSE_PEAK_PER_FILE_BYTE * sum(f.stat().st_size for f in self.directory.iterdir())
        tell = self.on_cost or (lambda n: None)
        try:
            tell(estimate)
        except ConfigurationError as exc:
            raise ConfigurationError(f"building the tokenizer of {self.name!r} takes ~{estimate >> 20} MiB, more than "
                                     f"the memory budget leaves beside the model: {exc}") from None
        before = current_anon()
        try:
            tok = AutoTokenizer.from_pretrained(str(self.directory), local_files_only=True)
        except Exception as exc:  # noqa: BLE001
            tell(-estimate)
            raise ModelError(f"cannot build the tokenizer of {self.name!r}: {exc}") from exc
        release_free_heap()  # parsing peaks at several times what the tokenizer keeps: give the rest back
        tell(max(0, current_anon() - before) - estimate)
        return tok


def copy_files(fetch: Callable[[str], bytes], names: list[str]) -> tuple[Path | None, Any]:
    """Fetch the chunks' auxiliary files into a new private directory: ``(directory or None when there is no
    tokenizer, the generation config or None)``."""
    gen = "generation_config.json" in names
    if not (set(names) & TOKENIZER_FILES) and not gen:
        return None, None
    tmp = Path(tempfile.mkdtemp(prefix="surfing-tok-"))
    try:
        for name in names:
            (tmp / name).write_bytes(fetch(name))
        config = None
        if gen:
            from transformers import GenerationConfig

            config = GenerationConfig.from_pretrained(str(tmp))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not set(names) & TOKENIZER_FILES:
        shutil.rmtree(tmp, ignore_errors=True)
        return None, config
    return tmp, config
