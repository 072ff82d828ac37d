"""``surfing chat``: an interactive conversation over one connection, keeping the KV cache across turns.

Reads one user message per stdin line (EOF or ``/exit`` ends it); answers stream to stdout.
"""

from __future__ import annotations

import argparse
import logging
import sys

from . import output
from .generate import log_plan, make_streamer, require_generative, require_tokenizer
from .options import add_client_args, add_common, open_model, positive_int

log = logging.getLogger("streaming_weights.cli")


def _lines(interactive: bool):
    while True:
        if interactive:
            sys.stderr.write("> ")
            sys.stderr.flush()
        line = sys.stdin.readline()
        if not line or line.strip() == "/exit":
            return
        if line.strip():
            yield line.strip()


def cmd_chat(args: argparse.Namespace) -> int:
    from ..chat import ChatSession

    with open_model(args, prefetch_count=args.prefetch) as model:
        require_generative(model)
        tok = require_tokenizer(model)
        log_plan(model)
        session = ChatSession(model, system=args.system, max_new_tokens=args.max_new_tokens)
        for turn, text in enumerate(_lines(sys.stdin.isatty()), 1):
            _, stats = session.reply(text, streamer=make_streamer(tok))
            if not output.STDOUT.at_line_start:
                output.write_stdout("\n")
            log.info("turn %d: %d prompt tokens reused from the KV cache, %d computed, %d generated",
                     turn, stats.reused_tokens, stats.computed_tokens, stats.generated_tokens)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="interactive chat with a streamed model (one connection, KV cache kept)")
    add_client_args(p, cache_size=4)
    p.add_argument("--system", default=None, help="system message sent before the first turn")
    p.add_argument("--max-new-tokens", type=positive_int, default=256, help="per answer")
    p.add_argument("--prefetch", type=int, default=2)
    add_common(p)
    p.set_defaults(func=cmd_chat)
