"""Incremental detokenization for one generated sequence, with OpenAI ``stop`` strings.

The text of a row is always ``tokenizer.decode(new_ids, skip_special_tokens=True)`` over *all* of its new
tokens (issue 13's decoding rule), so the streamed deltas concatenate to exactly the non-streamed text.
What may still change is held back: a trailing U+FFFD (the bytes of a multi-byte character that are not
all there yet) and a suffix that could be the start of a stop string.
"""

from __future__ import annotations

from typing import Any

_REPLACEMENT = "\ufffd"


class RowText:
    """The decoded text of one row as tokens arrive.

    Args:
        tokenizer: a transformers tokenizer.
        stop: strings that end the row; the returned text stops right before the first one (OpenAI's rule).
    """

    def __init__(self, tokenizer: Any, stop: tuple[str, ...] = ()) -> None:
        self._tok = tokenizer
        self._stop = tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.text = ""      # the current decoded text (cut at a stop string once one is found)
        self.sent = 0       # characters of ``text`` already handed out as deltas
        self.stopped = False

    def add(self, token_ids: list[int]) -> str:
        """Append tokens; returns the new text that is safe to send now (maybe empty).

        After a stop string appears, :attr:`stopped` is True and ``text`` ends right before it.
        """
        self.ids.extend(token_ids)
        text = self._tok.decode(self.ids, skip_special_tokens=True)
        cut = self._first_stop(text)
        if cut is not None:
            self.text, self.stopped = text[:cut], True
            return self._take(len(self.text))
        self.text = text
        return self._take(self._safe_end(text))

    def flush(self) -> str:
        """The rest of the text (at the end of the row nothing is held back any more)."""
        return self._take(len(self.text))

    def _take(self, end: int) -> str:
        if end <= self.sent:
            return ""
        delta, self.sent = self.text[self.sent:end], end
        return delta

    def _first_stop(self, text: str) -> int | None:
        # Only the region that could contain a new match is searched: earlier text was checked already.
        start = max(0, self.sent - max((len(s) for s in self._stop), default=0))
        found = [i for i in (text.find(s, start) for s in self._stop) if i >= 0]
        return min(found) if found else None

    def _safe_end(self, text: str) -> int:
        end = len(text)
        while end > self.sent and text[end - 1] == _REPLACEMENT:
            end -= 1
        # Hold back the longest suffix that some stop string starts with.
        hold = max((k for s in self._stop for k in range(1, min(len(s) - 1, end) + 1)
                    if text.endswith(s[:k], 0, end)), default=0)
        return max(end - hold, self.sent)
