"""File in, file out for the batch commands (``generate --prompts-file``, ``embed --input``).

Input: one item per line, or JSON Lines whose records carry the item under a key (``"prompt"`` /
``"text"``; the other fields are passed through to the output). Output: JSON Lines, or ``.npy`` vectors.
"""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, TextIO

from ..exceptions import ConfigurationError


def read_text_arg(value: str) -> str:
    """``-`` means the whole of stdin (trailing newline dropped); anything else is the text itself."""
    if value != "-":
        return value
    text = sys.stdin.read()
    return text[:-1] if text.endswith("\n") else text


def read_records(path: str, key: str) -> list[dict[str, Any]]:
    """Records ``{key: item, ...}`` from ``path`` (``-``: stdin): JSON Lines when the first non-blank line
    starts with ``{`` (each record must hold a string under ``key``), else one item per non-blank line.

    Raises:
        ConfigurationError: unreadable file, bad JSON, a record without ``key``, or no items at all.
    """
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigurationError(f"cannot read {path}: {exc.strerror or exc}") from None
    lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not lines:
        raise ConfigurationError(f"{path} holds no {key}s")
    if not lines[0][1].lstrip().startswith("{"):
        return [{key: line} for _, line in lines]
    records = []
    for n, line in lines:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigurationError(f"{path}:{n}: not JSON ({exc.msg})") from None
        if not isinstance(rec, dict) or not isinstance(rec.get(key), str):
            raise ConfigurationError(f"{path}:{n}: a JSON Lines record needs a string {key!r} field")
        records.append(rec)
    return records


@contextmanager
def open_output(path: str | None) -> Iterator[TextIO]:
    """``path`` opened for writing text (``None`` or ``-``: stdout)."""
    if path in (None, "-"):
        yield sys.stdout
        return
    try:
        with open(path, "w", encoding="utf-8") as f:
            yield f
    except OSError as exc:
        raise ConfigurationError(f"cannot write {path}: {exc.strerror or exc}") from None


def write_jsonl(path: str | None, records: list[dict[str, Any]]) -> None:
    with open_output(path) as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")


def check_vectors_path(path: str) -> None:
    """Raises ConfigurationError unless ``path`` is one :func:`save_vectors` can write (.npy, .jsonl, .json, -)."""
    if not (path == "-" or path.endswith((".npy", ".jsonl", ".json"))):
        raise ConfigurationError(f"--output must end in .npy or .jsonl (or be -), got {path}")


def save_vectors(path: str, records: list[dict[str, Any]], vectors: Any) -> None:
    """``.npy``: one float32 array (N, dim), row i for record i; ``.jsonl`` (or ``-``): each record plus
    its ``"embedding"``."""
    check_vectors_path(path)
    if path.endswith(".npy"):
        import numpy as np

        try:
            np.save(path, vectors.numpy().astype("float32"))
        except OSError as exc:
            raise ConfigurationError(f"cannot write {path}: {exc.strerror or exc}") from None
        return
    write_jsonl(path, [{**rec, "embedding": [float(x) for x in row]} for rec, row in zip(records, vectors)])


@contextmanager
def progress_bar(total: int, unit: str, *, quiet: bool) -> Iterator[Callable[[int, int], None]]:
    """A tqdm bar on stderr (none with ``--quiet``), as the library's ``progress(done, total)`` callback."""
    from tqdm import tqdm

    bar = tqdm(total=total, unit=unit, file=sys.stderr, disable=quiet, dynamic_ncols=True)

    def update(done: int, _total: int) -> None:
        bar.update(done - bar.n)

    try:
        yield update
    finally:
        bar.close()
