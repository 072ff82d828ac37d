"""Who may read which model: bearer tokens, each allowed all models or a list of them (no I/O but the file read).

A token file holds one token per line, ``TOKEN [MODEL[,MODEL...]]``; a token without models may read every
model. Blank lines and lines starting with ``#`` are ignored. Tokens are compared with
:func:`hmac.compare_digest` against every entry (no early exit), so the time taken does not say which
entry, or how much of a token, matched. A model a token may not read is indistinguishable from a model
that does not exist: the server filters every listing and not-found message through :meth:`Grant.visible`.
"""

from __future__ import annotations

import hmac
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, TypeVar

from ..exceptions import ConfigurationError

V = TypeVar("V")


@dataclass(frozen=True)
class Grant:
    """What one authenticated connection may read: ``models`` None means every hosted model."""

    models: frozenset[str] | None = None

    def allows(self, model: str) -> bool:
        return self.models is None or model in self.models

    def visible(self, models: Mapping[str, V]) -> dict[str, V]:
        """The part of ``models`` this grant may see (listings, not-found messages, model resolution)."""
        return {name: m for name, m in models.items() if self.allows(name)}

    @property
    def everything(self) -> bool:
        return self.models is None


#: The grant of a server without tokens: everything is public.
OPEN = Grant(None)


def parse_token_file(text: str, where: str) -> list[tuple[str, Grant]]:
    """``[(token, grant)]`` from token-file text. Raises ConfigurationError naming ``where`` and the line."""
    entries: list[tuple[str, Grant]] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        token, _, rest = line.replace("\t", " ").partition(" ")
        names = frozenset(n.strip() for n in rest.split(",") if n.strip())
        if any(" " in n for n in names):
            raise ConfigurationError(f"{where} line {lineno}: separate models with commas: TOKEN MODEL[,MODEL...]")
        entries.append((token, Grant(names or None)))
    if not entries:
        raise ConfigurationError(f"{where} holds no token")
    return entries


class AccessList:
    """The tokens a server accepts. Empty (no token, no file): the server is open to everyone.

    Args:
        token: one token allowed every model (the ``--token`` / ``$SURFING_TOKEN`` form).
        token_file: a token file (see the module docstring); :meth:`reload` re-reads it.

    Raises:
        ConfigurationError: the file is unreadable, empty or malformed.
    """

    def __init__(self, token: str | None = None, token_file: str | os.PathLike[str] | None = None) -> None:
        self.token = token or None
        self.token_file = Path(token_file) if token_file is not None else None
        self.entries: list[tuple[bytes, Grant]] = []
        self.reload()

    def reload(self) -> None:
        """Re-read the token file (if any); on error the previous entries stay in force."""
        entries = [(self.token, OPEN)] if self.token else []
        if self.token_file is not None:
            try:
                text = self.token_file.read_text(encoding="utf-8")
            except OSError as exc:
                raise ConfigurationError(f"cannot read token file {self.token_file}: {exc.strerror or exc}") from None
            entries += parse_token_file(text, f"token file {self.token_file}")
        self.entries = [(tok.encode(), grant) for tok, grant in entries]

    @property
    def enabled(self) -> bool:
        return bool(self.entries)

    def grant_for(self, given: str) -> Grant | None:
        """The grant of token ``given`` (None: not a token of this server), compared in constant time.

        Several entries for one token combine (a token listed twice may read both lists)."""
        probe = given.encode()
        found: list[Grant] = []
        for token, grant in self.entries:  # every entry, always: the loop's length leaks nothing
            if hmac.compare_digest(probe, token):
                found.append(grant)
        if not found:
            return None
        if any(g.everything for g in found):
            return OPEN
        return Grant(frozenset().union(*(g.models or () for g in found)))


__all__ = ["OPEN", "AccessList", "Grant", "parse_token_file"]
