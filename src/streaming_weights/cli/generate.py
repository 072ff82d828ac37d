"""``surfing generate`` (stream a model, print its answer) and ``surfing embed`` (sentence embeddings).

The answer alone goes to stdout (``surfing generate ... > answer.txt``); the stats line, warnings and
progress go to stderr, each on its own line.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from typing import Any

from ..exceptions import ConfigurationError
from . import output, records
from .options import add_client_args, add_common, non_negative_float, open_model, positive_int, probability

log = logging.getLogger("streaming_weights.cli")


def require_tokenizer(model: Any) -> Any:
    tok = model.tokenizer
    if tok is None:
        raise ConfigurationError(f"model {model.model_name!r} has no tokenizer files in its manifest")
    return tok


def require_generative(model: Any) -> None:
    """Raises ConfigurationError when the streamed model cannot generate text (an encoder such as BERT)."""
    hf = model.hf_model
    can = getattr(hf, "can_generate", None)
    if not (callable(can) and can()):
        raise ConfigurationError(f"{model.manifest.name} ({model.manifest.architecture}) is an encoder model: "
                                 "use surfing embed")


def make_streamer(tok: Any) -> Any:
    """A transformers TextStreamer that writes the new text to stdout through :func:`output.write_stdout`."""
    from transformers import TextStreamer

    class StdoutStreamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            output.write_stdout(text + ("\n" if stream_end else ""))

    return StdoutStreamer(tok, skip_prompt=True, skip_special_tokens=True)


def encode_prompt(tok: Any, prompt: str, *, chat: bool) -> dict[str, Any]:
    import torch

    from ..models.text import prompt_ids

    ids = torch.tensor([prompt_ids(tok, prompt, chat=chat)])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def stats_line(model: Any, seconds: float) -> str:
    """``[N tokens in S s, R tok/s | cache k/L units, hit rate, MiB fetched/token, stall]``."""
    s, c = model.get_inference_stats(), model.get_cache_info()
    n = s["generated_tokens"]
    return (f"[{n} tokens in {seconds:.2f} s, {n / max(seconds, 1e-9):.2f} tok/s | "
            f"cache {min(c['max_cache_size'], c['streamed_units'])}/{c['streamed_units']} units, hit rate "
            f"{c['hit_rate']:.0%}, {c['bytes_fetched'] / max(n, 1) / 2**20:.1f} MiB fetched/token, "
            f"stall {s['stall_seconds']:.2f} s]")


def log_plan(model: Any) -> None:
    """The memory plan the model was loaded with, as an info log line (shown with ``-v``)."""
    plan = getattr(model.engine, "plan", None)
    if plan is not None:
        log.info("memory plan for %s:\n  %s", model.manifest.name, plan.describe().replace("\n", "\n  "))


def stream_generate(model: Any, prompt: str, *, chat: bool, max_new_tokens: int, quiet: bool = False,
                    **gen: Any) -> None:
    """Generate (greedily unless ``gen`` asks for sampling), streaming the answer to stdout; the stats
    line goes to stderr (not with ``quiet``)."""
    require_generative(model)
    tok = require_tokenizer(model)
    enc = encode_prompt(tok, prompt, chat=chat)
    t0 = time.perf_counter()
    model.generate(**enc, max_new_tokens=max_new_tokens, streamer=make_streamer(tok), **gen)
    dt = time.perf_counter() - t0
    if not output.STDOUT.at_line_start:
        output.write_stdout("\n")
    if not quiet:
        print(stats_line(model, dt), file=sys.stderr, flush=True)


def generation_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Decoding options from the flags: greedy unless --temperature > 0 (--top-p/--top-k refine sampling)."""
    sampling = args.temperature is not None and args.temperature > 0
    gen: dict[str, Any] = {"do_sample": sampling, "speculation": args.speculation}
    if sampling:
        gen.update({k: v for k, v in (("temperature", args.temperature), ("top_p", args.top_p),
                                      ("top_k", args.top_k)) if v is not None})
    elif args.top_p is not None or args.top_k is not None:
        raise ConfigurationError("--top-p/--top-k refine sampling: give --temperature > 0 too")
    if args.seed is not None:
        from transformers import set_seed

        set_seed(args.seed)
    return gen


def generate_file(model: Any, args: argparse.Namespace, gen: dict[str, Any], recs: list[dict[str, Any]]) -> None:
    """--prompts-file: every prompt through generate_text in batches, JSON Lines out (input fields kept)."""
    require_generative(model)
    t0 = time.perf_counter()
    with records.progress_bar(len(recs), "prompt", quiet=args.quiet) as progress:
        texts = model.generate_text([r["prompt"] for r in recs], batch_size=args.batch_size, chat=args.chat,
                                    max_new_tokens=args.max_new_tokens, progress=progress, **gen)
    records.write_jsonl(args.output, [{**r, "text": t} for r, t in zip(recs, texts)])
    if not args.quiet:
        print(stats_line(model, time.perf_counter() - t0), file=sys.stderr, flush=True)


def cmd_generate(args: argparse.Namespace) -> int:
    # Flag and input-file errors come before the model is loaded (a bad file costs no download).
    gen = generation_kwargs(args)
    recs = records.read_records(args.prompts_file, "prompt") if args.prompts_file is not None else None
    with open_model(args, prefetch_count=args.prefetch, cache_policy=args.policy) as model:
        log_plan(model)
        if recs is not None:
            generate_file(model, args, gen, recs)
        else:
            stream_generate(model, records.read_text_arg(args.prompt), chat=args.chat,
                            max_new_tokens=args.max_new_tokens, quiet=args.quiet, **gen)
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    """--text: one JSON object on stdout; --input FILE: vectors to --output (.npy or .jsonl)."""
    recs = records.read_records(args.input, "text") if args.input else [{"text": t} for t in args.text]
    if args.input:
        records.check_vectors_path(args.output)  # before the model is loaded
    with open_model(args) as model:
        require_tokenizer(model)
        with records.progress_bar(len(recs), "text", quiet=args.quiet or not args.input) as progress:
            emb = model.embed([r["text"] for r in recs], batch_size=args.batch_size, pooling=args.pooling,
                              normalize=args.normalize, allow_decoder=args.allow_decoder, progress=progress)
        name = model.manifest.name
    if args.input:
        records.save_vectors(args.output, recs, emb)
        return 0
    print(json.dumps({"model": name, "dim": emb.shape[1],
                      "embeddings": [[float(x) for x in row] for row in emb]}))
    return 0


def speculation_arg(text: str) -> str | int:
    """argparse type for --speculation: auto, off or a draft length N >= 1."""
    from ..models.generation import parse_speculation  # lazy: building the parser must not import torch

    try:
        return parse_speculation(text)
    except ConfigurationError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="stream a model from a server and generate text")
    add_client_args(p, cache_size=4, memory="auto")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="the prompt (- reads it from stdin)")
    src.add_argument("--prompts-file", metavar="FILE",
                     help="one prompt per line, or JSON Lines with a \"prompt\" field; answers go to --output")
    p.add_argument("--output", metavar="FILE", help="with --prompts-file: JSON Lines answers (default stdout)")
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help="prompts per generate call (default: the library chooses)")
    p.add_argument("--temperature", type=non_negative_float, default=None,
                   help="> 0 samples, 0 is greedy (default: greedy)")
    p.add_argument("--top-p", type=probability, default=None, help="nucleus sampling, in (0, 1]")
    p.add_argument("--top-k", type=positive_int, default=None)
    p.add_argument("--seed", type=int, default=None, help="seed for sampling")
    p.add_argument("--speculation", type=speculation_arg, default=None,
                   help="auto (default: draft from the context when greedy), off, or a draft length N")
    p.add_argument("--max-new-tokens", type=positive_int, default=64)
    p.add_argument("--prefetch", type=int, default=2)
    p.add_argument("--policy", choices=["order", "lru"], default="order")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    add_common(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("embed", help="mean-pooled sentence embeddings (JSON) from a streamed encoder")
    add_client_args(p, cache_size=2)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", nargs="+")
    src.add_argument("--input", metavar="FILE", help="one text per line, or JSON Lines with a \"text\" field")
    p.add_argument("--output", metavar="FILE", default="-",
                   help="with --input: vectors.npy or vectors.jsonl (default: JSON Lines on stdout)")
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help="texts per forward pass (default: large length-sorted blocks)")
    p.add_argument("--pooling", choices=["mean", "cls"], default="mean")
    p.add_argument("--normalize", action="store_true")
    p.add_argument("--allow-decoder", action="store_true",
                   help="embed with a decoder-only language model anyway (pooled hidden states, not trained "
                        "sentence embeddings; refused without this flag)")
    add_common(p)
    p.set_defaults(func=cmd_embed)
