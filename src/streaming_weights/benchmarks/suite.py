"""The suite: shared state of one run (model under test, its server, child results) and :func:`run_suite`."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable

from . import api, budget, cache_policy, chunking, cold_start, embeddings, generation, gpu, memory, overlap, peers
from . import moe, quant, scale, transfer
from ..config import bench_cpus_from_env
from .common import MiB, Progress, machine_description, run_child, unit_bound, weight_server_process
from .fixtures import build_random_llama, chunk_source, export_hf_dir, grounded_prompt, load_manifest
from .sandbox import cap_support, evict, usable_cpus
from .plots import write_plots
from .report import render_report, splice_report

CASE_FUNCS: dict[str, Callable[[Any], dict[str, Any]]] = {
    "generation": generation.run, "cold_start": cold_start.run, "transfer": transfer.run, "overlap": overlap.run,
    "cache": cache_policy.run, "memory": memory.run, "budget": budget.run, "peers": peers.run, "quant": quant.run,
    "embeddings": embeddings.run, "api": api.run, "chunker": chunking.run, "gpu": gpu.run, "moe": moe.run,
    "scale": scale.run,
}
CASES = tuple(CASE_FUNCS)
#: Cases that build, chunk and serve a model of their own: run alone, the suite's model is not prepared.
OWN_MODEL = frozenset({"moe", "scale"})
# Fresh-process measurements each case needs (with --quick they share one process).
_NEEDS = {"memory": ["stream", "hf_memory"], "cold_start": ["stream", "download"],
          "peers": ["hf_memory", "accelerate", "stream"]}


def _default_chunks(tmp: Path, quick: bool, say: Progress) -> tuple[Path, Path | None]:
    if quick:
        say("building a tiny random-init LLaMA")
        src = build_random_llama(tmp / "tiny-llama", layers=6, hidden=128, intermediate=256, vocab=512)
        return chunk_source(src, tmp / "tiny-chunks", "tiny-llama"), src
    from ..demo import ensure_demo_chunks

    say("preparing SmolLM2-135M-Instruct chunks (cached after the first run)")
    return ensure_demo_chunks(progress=False), None


class Suite:
    """Shared state of one suite run: the model under test, its server, child results reused by cases."""

    def __init__(self, *, quick: bool, tmp: Path, progress: Progress | None, chunks_dir: Path | None,
                 source_path: Path | None, shared_model: bool = True) -> None:
        self.quick, self.tmp, self._progress = quick, tmp, progress
        self.repeats = 1 if quick else 2
        self.gen_tokens = 4 if quick else 8
        self.prompt_len = 8
        self.stream_cache = 2 if quick else 4
        self.stream_prefetch = 1 if quick else 2
        self.overlap_seq = 16 if quick else 128
        self.child_errors: dict[str, str] = {}
        self._children: dict[str, list[dict[str, Any]]] = {}
        self._planned: list[str] = []
        self.source_path = Path(source_path) if source_path is not None else None
        self.chunks_dir: Path | None = None
        self.manifest: Any = None
        self.vocab = 100
        self.model_label = "none shared (each case that ran builds its own model: see its section)"
        if shared_model:  # False: only cases of OWN_MODEL run, the suite's model is not needed
            self._use_model(chunks_dir)
        self._hf_dir: Path | None = None
        self._airllm_shards: Path | None = None
        self.uri = ""
        self.cap_kind, self.cap_reason = cap_support()
        # SURFING_BENCH_CPUS="1,0": which cores the client and server take (two suites side by side)
        cpus = bench_cpus_from_env() or usable_cpus()
        # the client (one compute thread) on the first core, the weight server on the next: it stands for
        # another host, so it must not take the client's core
        self.client_cpus, self.server_cpus = [cpus[0]], [cpus[1] if len(cpus) > 1 else cpus[0]]
        self.headline_tokens = 4 if quick else 8
        self.airllm_tokens, self.airllm_timeout = 3, 600
        self.generation_rounds = 3
        self._prompt: tuple[list[int], str] | None = None

    def _use_model(self, chunks_dir: Path | None) -> None:
        """The model under test: ``chunks_dir``, else the default (SmolLM2, or a tiny LLaMA with --quick)."""
        if chunks_dir is None:
            chunks_dir, self.source_path = _default_chunks(self.tmp, self.quick, self.say)
        self.chunks_dir = Path(chunks_dir)
        self.manifest = m = load_manifest(self.chunks_dir)
        self.vocab = int(m.config.get("vocab_size", 100))
        self.model_label = (f"{m.name} ({m.architecture}, {len(m.streamed)} streamed layers, "
                            f"{m.total_bytes / MiB:.0f} MiB {m.dtype})")

    def say(self, msg: str) -> None:
        if self._progress is not None:
            self._progress(msg)

    @property
    def hf_dir(self) -> Path:
        if self._hf_dir is None:
            self.say("exporting the chunked model as a transformers directory (for the peers)")
            self._hf_dir = export_hf_dir(self.chunks_dir, self.tmp / "hf-export")
        return self._hf_dir

    @property
    def method_line(self) -> str:
        cap = (f"Each contender in a fresh process inside a cgroup memory cap ({self.cap_reason})"
               if self.cap_kind else f"Each contender in a fresh process, UNCAPPED ({self.cap_reason})")
        return (f"{cap}, its files evicted from the page cache (posix_fadvise DONTNEED) before each run, "
                f"pinned to CPU {self.client_cpus[0]} with one compute thread; the weight server pinned to "
                f"CPU {self.server_cpus[0]}.")

    def prompt_info(self) -> tuple[list[int], str]:
        if self._prompt is None:
            self._prompt = grounded_prompt(self.hf_dir, self.vocab)
        return self._prompt

    @property
    def prompt(self) -> list[int]:
        return self.prompt_info()[0]

    @property
    def prompt_kind(self) -> str:
        return self.prompt_info()[1]

    def airllm_shards(self) -> Path:
        """AirLLM's per-layer split of the checkpoint (made once, uncapped, outside any timing)."""
        if self._airllm_shards is None:
            # kept between full runs (the split takes minutes): the cache directory, keyed by model name
            from ..demo import cache_dir

            shards = (self.tmp / "airllm-shards" if self.quick
                      else cache_dir() / "bench" / f"airllm-{self.manifest.name}")
            self.say("AirLLM: splitting the checkpoint into its per-layer shards (once)")
            r = run_child("airllm_prepare", {"path": str(self.hf_dir), "shards": str(shards)}, timeout=600)
            if "error" in r:
                self.child_errors["airllm"] = r["error"]
            self._airllm_shards = shards
        return self._airllm_shards

    def gen_args(self, kind: str) -> dict[str, Any]:
        """A headline-generation child's arguments: the grounded prompt, one thread, this suite's server."""
        return {"tokens": self.headline_tokens, "prompt": self.prompt, "prompt_len": len(self.prompt),
                "vocab": self.vocab, "name": self.manifest.name, "uri": self.uri, "threads": 1}

    def sandboxed(self, kind: str, args: dict[str, Any], *, cap: int | None, evict_paths: list[Any] = (),
                  timeout: float = 600, module: str = "child") -> dict[str, Any]:
        """One fresh-process run of ``kind`` (of child module ``module``) in the product's setting:
        ``evict_paths`` dropped from the page cache, capped (when this machine allows), pinned to the client
        core. Errors come back as ``{"error": ...}``."""
        evict(evict_paths)
        return run_child(kind, args, timeout, cap=cap if self.cap_kind else None, cpus=self.client_cpus,
                         module=module)

    def _child_args(self, kind: str) -> dict[str, Any]:
        common = {"tokens": self.gen_tokens, "prompt_len": self.prompt_len, "vocab": self.vocab,
                  "name": self.manifest.name, "uri": self.uri, "threads": 1}
        if kind == "stream":
            return common | {"cache": self.stream_cache, "prefetch": self.stream_prefetch}
        if kind == "download":
            return common | {"tmp": str(self.tmp / "download")}
        if kind == "hf_memory":
            return common | {"path": str(self.hf_dir)}
        if kind == "accelerate":
            budget = unit_bound(self.manifest, self.stream_cache, self.stream_prefetch)
            return common | {"path": str(self.hf_dir), "budget": budget, "offload": str(self.tmp / "offload")}
        if kind == "airllm":
            return common | {"path": str(self.hf_dir), "shards": str(self.tmp / "airllm-shards")}
        if kind == "chunk":
            return {"source": str(self.source_path or self.hf_dir), "out": str(self.tmp / "chunk-out-quick")}
        raise ValueError(kind)

    def plan(self, cases: list[str]) -> None:
        """Fresh-process measurements the selected cases need (run together in one process with --quick)."""
        need = dict(_NEEDS, chunker=["chunk"] if self.quick else [])
        self._planned = list(dict.fromkeys(k for c in cases for k in need.get(c, [])))

    def _run_planned_together(self) -> None:
        todo = [k for k in self._planned if k not in self._children]
        self.say(f"one fresh process (--quick): {', '.join(todo)}")
        r = run_child("multi", {"runs": [[k, self._child_args(k)] for k in todo], "threads": 1}, timeout=600,
                      cpus=self.client_cpus)
        if "error" in r:
            raise RuntimeError(f"{'+'.join(todo)}: {r['error']}")
        for k, res in zip(todo, r["results"]):
            self._children[k] = [res]

    def child_runs(self, kind: str, repeats: int | None = None) -> list[dict[str, Any]]:
        """Results of ``repeats`` fresh-process runs of ``kind`` (run once, shared by every case)."""
        if kind not in self._children and self.quick and kind in self._planned:
            self._run_planned_together()
        if kind not in self._children:
            n = self.repeats if repeats is None else repeats
            res = []
            for i in range(n):
                self.say(f"fresh process: {kind} ({i + 1}/{n})")
                r = run_child(kind, self._child_args(kind), timeout=self.airllm_timeout if kind == "airllm" else 600,
                              cpus=self.client_cpus)
                if "error" in r:
                    self.child_errors[kind] = r["error"]
                    if kind == "airllm":  # optional peer: its absence is reported, not fatal
                        break
                    raise RuntimeError(f"{kind}: {r['error']}")
                res.append(r)
            self._children[kind] = res
        return self._children[kind]


def _versions() -> dict[str, str]:
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__}


def source_commit() -> str:
    """The git commit of the tree this package runs from (``+ uncommitted changes`` when dirty), or ``?``."""
    root = Path(__file__).resolve().parents[3]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=30, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=30, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"
    return head + (" + uncommitted changes" if dirty else "")


def _run_cases(suite: Suite, selected: list[str], results: dict[str, Any],
               checkpoint: Callable[[], None] = lambda: None) -> None:
    server = nullcontext("") if suite.manifest is None else weight_server_process(
        suite.chunks_dir, cache_mb=suite.manifest.total_bytes / MiB * 1.2 + 64, cpus=suite.server_cpus)
    with server as uri:
        suite.uri = uri
        for name in selected:
            suite.say(f"case {name}")
            t0, load0 = time.perf_counter(), os.getloadavg()[0]
            try:
                res = CASE_FUNCS[name](suite)
            except Exception as exc:  # noqa: BLE001 - one failing case must not lose the others
                res = {"title": name, "error": f"{type(exc).__name__}: {exc}"}
            res["seconds"] = time.perf_counter() - t0
            res["load_average"] = [load0, os.getloadavg()[0]]  # 1-min load at the case's start and end
            results["cases"][name] = res
            checkpoint()  # a suite stopped later still leaves the cases done so far


def _merge_previous(results: dict[str, Any], old: dict[str, Any]) -> None:
    """Add the cases of an earlier run ``old`` (same mode) that this run did not repeat, in suite order."""
    if old.get("quick") != results["quick"]:
        return
    for case in results["cases"].values():
        case.setdefault("ran", results["started"])
        case.setdefault("commit", results.get("commit", "?"))
    merged = {}
    for name in CASES:
        if name in results["cases"]:
            merged[name] = results["cases"][name]
        elif name in old.get("cases", {}):
            was = old["cases"][name]
            merged[name] = was | {"ran": was.get("ran", old.get("started", "?")),
                                  "commit": was.get("commit", old.get("commit", "?"))}
    results["cases"] = merged
    results["seconds"] = results.get("seconds", 0.0) + old.get("seconds", 0.0)


def run_suite(out_dir: str | os.PathLike[str] = "bench", *, quick: bool = False, cases: list[str] | None = None,
              progress: Progress | None = None, chunks_dir: str | os.PathLike[str] | None = None,
              source_path: str | os.PathLike[str] | None = None, merge: bool = False,
              notes: tuple[str, ...] | list[str] = ()) -> dict[str, Any]:
    """Run the benchmark cases and write ``results.json``, ``REPORT.md`` and PNG plots into ``out_dir``.

    Args:
        out_dir: output directory (created).
        quick: a tiny random-init model and one run per case (about a minute), for smoke tests.
        cases: subset of :data:`CASES` (default: all).
        progress: called with a short message as the suite advances.
        chunks_dir: benchmark this chunked LLaMA-family model instead of the default (SmolLM2, or a tiny
            random-init LLaMA with ``quick``); ``source_path`` is its original checkpoint (for the
            chunker case in quick mode).
        merge: keep the results of the cases not run now from ``out_dir/results.json`` (re-run a few
            cases and still write the whole report); the report names when each case ran. Without a
            ``results.json`` (it is not committed) but with a ``REPORT.md``, only this run's cases' sections
            and ratio rows are replaced in that report.
        notes: lines the report shows at the top (e.g. what else ran on the machine meanwhile).

    Returns:
        The results dict also written to ``results.json``. A case that fails records ``{"error": ...}``.

    Raises:
        ValueError: an unknown case name.
    """
    selected = list(CASES) if not cases else list(cases)
    unknown = [c for c in selected if c not in CASES]
    if unknown:
        raise ValueError(f"unknown benchmark case(s) {unknown}; choose from {list(CASES)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    results: dict[str, Any] = {"machine": machine_description(), "quick": quick, "merged": merge,
                               "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "cases": {},
                               "versions": _versions(), "commit": source_commit(),
                               "notes": list(notes), "load_average_start": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="surfing-bench-") as tmp:
        suite = Suite(quick=quick, tmp=Path(tmp), progress=progress,
                      chunks_dir=Path(chunks_dir) if chunks_dir else None,
                      source_path=Path(source_path) if source_path else None,
                      shared_model=bool(chunks_dir) or not set(selected) <= OWN_MODEL)
        if quick and suite.source_path is None and "chunker" in selected:
            suite.source_path = suite.hf_dir
        results["model"] = suite.model_label
        results["setting"] = {"cap_kind": suite.cap_kind, "cap_reason": suite.cap_reason,
                              "client_cpus": suite.client_cpus, "server_cpus": suite.server_cpus}
        suite.plan(selected)
        previous = out / "results.json"
        prior = json.loads(previous.read_text()) if merge and previous.is_file() else None
        # --merge into a report whose results.json is gone (it is not committed): splice the sections in
        splice = merge and (out / "REPORT.md").is_file() and (prior is None or bool(prior.get("spliced")))

        def checkpoint() -> None:
            _write(dict(results, seconds=time.perf_counter() - t_start), out, prior, splice)

        _run_cases(suite, selected, results, checkpoint)
    results["seconds"] = time.perf_counter() - t_start
    results["load_average_end"] = os.getloadavg()
    return _write(results, out, prior, splice)


def _write(results: dict[str, Any], out: Path, prior: dict[str, Any] | None, splice: bool = False) -> dict[str, Any]:
    """Merge ``prior`` (``--merge``), draw the plots, write results.json and REPORT.md; returns the results.

    ``splice``: REPORT.md is an earlier report without its results.json: only this run's cases' sections
    (and ratio rows) are replaced in it, and results.json records that (a later merge splices again)."""
    if prior is not None:
        _merge_previous(results, prior)
    results["plots"] = write_plots(results, out)
    report = out / "REPORT.md"
    if splice:
        results["spliced"] = True
        for case in results["cases"].values():
            case.setdefault("ran", results["started"])
            case.setdefault("commit", results.get("commit", "?"))
        # only this run's cases: the ones merged from results.json keep their sections (and their notes)
        fresh = {n: c for n, c in results["cases"].items() if c["ran"] == results["started"]}
        text = splice_report(report.read_text(), results | {"cases": fresh})
    else:
        text = render_report(results)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=float))
    report.write_text(text)
    return results
