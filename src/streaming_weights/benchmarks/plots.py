"""PNG figures (matplotlib, Agg) of a results dict: one or two per case, written next to REPORT.md."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .common import MiB
from .report import fmt


class _Plotter:
    """Draws the figures of one results dict into ``out``; ``made`` maps case -> file names."""

    def __init__(self, results: dict[str, Any], out: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        self.plt = plt
        self.results = results
        self.cases = results["cases"]
        self.out = out
        self.made: dict[str, list[str]] = {}
        self.mach = "shared 2-core box" if os.cpu_count() == 2 else f"{os.cpu_count()} cores, shared"

    def ok(self, case: str) -> dict[str, Any] | None:
        c = self.cases.get(case)
        return c if c and "error" not in c else None

    def save(self, fig: Any, case: str, fname: str) -> None:
        fig.tight_layout()
        fig.savefig(self.out / fname, dpi=110)
        self.plt.close(fig)
        self.made.setdefault(case, []).append(fname)

    @staticmethod
    def annotate(ax: Any, values: list[float]) -> None:
        for i, v in enumerate(values):
            ax.annotate(fmt(v), (i, v), ha="center", va="bottom", fontsize=8, xytext=(0, 3),
                        textcoords="offset points")

    def bars(self, case: str, fname: str, keys: list[tuple[str, str]], ylabel: str, title: str) -> None:
        """Median bars with min–max error bars for the metrics ``keys`` ([(metric, label)]) of ``case``."""
        c = self.ok(case)
        if c is None:
            return
        ms = {**c.get("metrics", {}), **c.get("ratios", {})}
        keys = [(k, lbl) for k, lbl in keys if k in ms]
        if not keys:
            return
        med = [ms[k]["median"] for k, _ in keys]
        err = [[ms[k]["median"] - ms[k]["min"] for k, _ in keys], [ms[k]["max"] - ms[k]["median"] for k, _ in keys]]
        fig, ax = self.plt.subplots(figsize=(7, 3.8))
        ax.bar([lbl for _, lbl in keys], med, yerr=err, capsize=4, color="#4878a8")
        self.annotate(ax, med)
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.tick_params(axis="x", labelsize=8)
        self.save(fig, case, fname)

    def overlap_stall(self) -> None:
        c = self.ok("overlap")
        if c is None or not c.get("stall_per_layer_s"):
            return
        per = c["stall_per_layer_s"]
        fig, ax = self.plt.subplots(figsize=(8, 3.5))
        ax.bar(range(len(per)), [v * 1000 for v in per.values()], color="#c0504d")
        ax.set_xlabel("streamed layer (execution order)")
        ax.set_ylabel("stall (ms, median)")
        ax.set_title(f"Compute waiting on weights, per layer, cache 0 + prefetch ({self.mach})", fontsize=10)
        self.save(fig, "overlap", "overlap_stall.png")

    def cache_curve(self) -> None:
        c = self.ok("cache")
        if c is None:
            return
        cv = c["curve"]
        total = cv["streamed_bytes"]
        fig, ax = self.plt.subplots(figsize=(7, 4))
        ax.plot(cv["sizes"], [b / total for b in cv["lru_bytes_per_token"]], "o-", label="lru (original)")
        ax.plot(cv["sizes"], [b / total for b in cv["order_bytes_per_token"]], "s-", label="order (default)")
        ks = list(range(0, cv["L"] + 1))
        ax.plot(ks, [(cv["L"] - k) / cv["L"] for k in ks], "k--", lw=1, label="(L−k)/L")
        ax.set_xlabel(f"cache_size k (units kept between uses; L = {cv['L']})")
        ax.set_ylabel("bytes fetched per token / streamed model bytes")
        ax.set_title(f"Cache policy: bytes per generated token ({total / cv['L'] / MiB:.1f} MiB per layer)",
                     fontsize=10)
        ax.legend()
        ax.grid(alpha=0.3)
        self.save(fig, "cache", "cache_policy.png")

    def peers(self) -> None:
        c = self.ok("peers")
        if c is None:
            return
        ms = c["metrics"]
        labels = {"transformers_in_memory": "transformers\nin memory",
                  "accelerate_disk_offload": "accelerate\ndisk offload", "airllm": "AirLLM",
                  "streaming_loopback": "streaming\n(loopback)"}
        names = [n for n in labels if f"{n}_generate_s" in ms]
        fig, axes = self.plt.subplots(1, 2, figsize=(10, 4))
        for ax, key, ylabel, log in ((axes[0], "generate_s", "generate() seconds", True),
                                     (axes[1], "peak_over_baseline_MiB", "peak RSS over baseline (MiB)", False)):
            vals = [ms[f"{n}_{key}"] for n in names]
            med = [v["median"] for v in vals]
            err = [[v["median"] - v["min"] for v in vals], [v["max"] - v["median"] for v in vals]]
            ax.bar([labels[n] for n in names], med, yerr=err, capsize=4,
                   color=["#808080", "#4878a8", "#9b59b6", "#2e8b57"][: len(names)])
            self.annotate(ax, med)
            if log:
                ax.set_yscale("log")
            ax.set_ylabel(ylabel)
            ax.tick_params(axis="x", labelsize=8)
        fig.suptitle(f"Peers: {self.results.get('model', '')}, same weight budget ({self.mach})", fontsize=9)
        self.save(fig, "peers", "peers.png")


    def grouped(self, case: str, fname: str, groups: list[str], series: list[tuple[str, str]], key: str,
                ylabel: str, title: str, log: bool = False) -> None:
        """Grouped median bars (min–max error bars): metric ``f"{group}_{series}_{key}"`` per group x series."""
        c = self.ok(case)
        if c is None:
            return
        ms = c.get("metrics", {})
        series = [(s, lbl) for s, lbl in series if any(f"{g}_{s}_{key}" in ms for g in groups)]
        if not series:
            return
        import numpy as np

        fig, ax = self.plt.subplots(figsize=(9, 4))
        width = 0.8 / len(series)
        x = np.arange(len(groups))
        for i, (sname, lbl) in enumerate(series):
            vals = [ms.get(f"{g}_{sname}_{key}") for g in groups]
            med = [v["median"] if v else float("nan") for v in vals]
            err = [[v["median"] - v["min"] if v else 0 for v in vals], [v["max"] - v["median"] if v else 0 for v in vals]]
            ax.bar(x + i * width - 0.4 + width / 2, med, width, yerr=err, capsize=3, label=lbl)
        ax.set_xticks(x, groups)
        if log:
            ax.set_yscale("log")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7)
        self.save(fig, case, fname)


    def budget_curve(self) -> None:
        c = self.ok("budget")
        if c is None or not c.get("points"):
            return
        pts = c["points"]
        fig, (a1, a2) = self.plt.subplots(1, 2, figsize=(10, 3.8))
        xs = [p["budget"] / MiB for p in pts]
        a1.plot(xs, [p["tokens_per_s"] for p in pts], "o-")
        a1.set_xlabel("memory_budget (MiB)")
        a1.set_ylabel("tokens/s")
        a1.grid(alpha=0.3)
        a2.plot(xs, [p["peak"] / MiB for p in pts], "o-", label="peak over baseline")
        a2.plot(xs, [(p["bound"] or float("nan")) / MiB for p in pts], "s--", label="plan bound_bytes")
        a2.plot(xs, xs, "k:", lw=1, label="budget")
        a2.set_xlabel("memory_budget (MiB)")
        a2.set_ylabel("MiB")
        a2.legend(fontsize=7)
        a2.grid(alpha=0.3)
        fig.suptitle(f"tokens/s and memory vs budget ({self.mach})", fontsize=9)
        self.save(fig, "budget", "budget.png")


    def moe(self) -> None:
        """Bytes and seconds per decoded token, one bar per contender (accelerate has no byte counter)."""
        c = self.ok("moe")
        if c is None:
            return
        ms = c["metrics"]
        names = [("expert_units", "ours\nexpert units"), ("whole_layer", "ours\nwhole-layer units"),
                 ("accelerate", "accelerate\ndisk offload"), ("transformers", "transformers\nin memory")]
        fig, axes = self.plt.subplots(1, 2, figsize=(10, 4))
        for ax, key, ylabel in ((axes[0], "MiB_per_token", "MiB fetched per decoded token"),
                                (axes[1], "s_per_token", "seconds per decoded token")):
            shown = [(n, lbl) for n, lbl in names if f"{n}_{key}" in ms]
            med = [ms[f"{n}_{key}"]["median"] for n, _ in shown]
            ax.bar([lbl for _, lbl in shown], med, color=["#2e8b57", "#4878a8", "#9b59b6", "#808080"][: len(shown)])
            self.annotate(ax, med)
            ax.set_ylabel(ylabel)
            ax.tick_params(axis="x", labelsize=8)
        streamed = c.get("streamed_bytes", 0) / MiB
        axes[0].axhline(0.2 * streamed, color="k", ls=":", lw=1, label=f"0.2 x streamed ({fmt(0.2 * streamed)} MiB)")
        axes[0].legend(fontsize=7)
        fig.suptitle(f"Mixture-of-experts (64 experts, top-4), budget {c.get('budget_bytes', 0) / MiB:.0f} MiB "
                     f"= 35% of {fmt(streamed)} MiB streamed + runtime ({self.mach})", fontsize=9)
        self.save(fig, "moe", "moe.png")


    def scale(self) -> None:
        """Time to result and seconds per decoded token per contender; the physical limit (bytes per token /
        measured bandwidth) as a black tick on each s/token bar."""
        c = self.ok("scale")
        if c is None:
            return
        short = {"transformers": "transformers\nin memory\n(uncapped)", "server": "ours\nserver", "local": "ours\nlocal dir",
                 "int8_codes": "ours int8\ncodes", "int4_codes": "ours int4\ncodes", "int8_kernel": "ours int8\nkernel",
                 "int4_kernel": "ours int4\nkernel", "accelerate": "accelerate\ndisk offload"}
        ms = c["metrics"]
        names = [n for n in short if f"{n}_time_to_result_s" in ms]
        labels = [short[n] for n in names]
        fig, axes = self.plt.subplots(1, 2, figsize=(12, 4.6))
        for ax, key, ylabel in ((axes[0], "time_to_result_s", "seconds, build model -> 6th token"),
                                (axes[1], "s_per_token", "seconds per decoded token")):
            vals = [ms[f"{n}_{key}"] for n in names]
            med = [v["median"] for v in vals]
            err = [[v["median"] - v["min"] for v in vals], [v["max"] - v["median"] for v in vals]]
            ax.bar(range(len(names)), med, yerr=err, capsize=3,
                   color=["#808080" if n == "transformers" else "#9b59b6" if n == "accelerate" else "#2e8b57"
                          for n in names])
            self.annotate(ax, med)
            ax.set_xticks(range(len(names)), labels, fontsize=7)
            ax.set_ylabel(ylabel)
        limits = [(i, ms[f"{n}_limit_s_per_token"]["median"]) for i, n in enumerate(names)
                  if f"{n}_limit_s_per_token" in ms]
        if limits:
            axes[1].scatter([i for i, _ in limits], [v for _, v in limits], marker="_", s=600, color="k", zorder=3,
                            label="physical limit: bytes/token / measured bandwidth")
            axes[1].legend(fontsize=7)
        fig.suptitle(f"TinyLlama-1.1B shape inside a 1.5 GB cap, one compute thread, bf16 ({self.mach})", fontsize=9)
        self.save(fig, "scale", "scale.png")


def write_plots(results: dict[str, Any], out: Path) -> dict[str, list[str]]:
    """Draw the figures for the cases that ran (failed ones are skipped); returns {case: [file names]}."""
    p = _Plotter(results, out)
    gen = p.ok("generation")
    if gen is not None:
        p.grouped("generation", "generation.png", ["uncapped", *gen.get("caps", [])],
                  [("transformers", "transformers in memory"), ("accelerate", "accelerate disk offload"),
                   ("airllm", "AirLLM"), ("ours", "ours (budget auto)"), ("ours_speculation", "ours + speculation"),
                   ("ours_batch8", "ours batch 8 (per row-token)")], "s_per_token", "seconds per token (log)",
                  f"Greedy generation inside memory caps, cold page cache, pinned ({p.mach})", log=True)
    p.bars("transfer", "transfer.png",
           [("raw_tcp_GBps", "raw TCP\nrecv_into"),
            ("websocketsource_network_only_GBps", "WebSocketSource\nnetwork only"),
            ("websocketsource_end_to_end_GBps", "WebSocketSource\n+verify+decode"),
            ("websocketsource_refetch_GBps", "refetch\n(fingerprint)"),
            ("original_hex_json_GBps", "original\nhex-in-JSON")],
           "GB/s (median, min–max)", f"Transfer of one large unit over loopback ({p.mach})")
    p.bars("overlap", "overlap.png",
           [("streamed_forward_s", "streamed\n(prefetch)"), ("compute_only_s", "compute only"),
            ("fetch_only_s", "fetch only"), ("stall_total_s", "stall total")],
           "seconds per forward pass", f"Overlap of fetch and compute ({p.mach})")
    p.overlap_stall()
    p.cache_curve()
    p.bars("memory", "memory.png",
           [("streaming_peak_over_baseline_MiB", "streaming\npeak"), ("weight_bound_MiB", "bound\n(weights)"),
            ("full_model_peak_over_baseline_MiB", "full model\n(transformers)")],
           "MiB over import baseline", f"Peak RSS, fresh processes ({p.mach})")
    cold = p.ok("cold_start")
    if cold is not None:
        p.grouped("cold_start", "cold_start.png", cold.get("links", ["loopback"]),
                  [("streaming", "streaming"), ("download_then_load", "download + load")], "time_to_first_token_s",
                  "seconds to first token", f"Cold start by link (surfing serve --max-rate; {p.mach})")
    p.peers()
    p.budget_curve()
    p.bars("quant", "quant.png", [(f"{k}_perplexity", f"{k} perplexity") for k in ("fp32", "int8", "int4")],
           "perplexity", f"Quantized chunks: perplexity (stored MiB in the table) ({p.mach})")
    p.bars("embeddings", "embeddings.png", [("block_texts_per_s", "block schedule"),
                                            ("per_batch_texts_per_s", "per batch")],
           "texts/s", f"Embeddings throughput, streaming MiniLM ({p.mach})")
    api_case = p.ok("api")
    if api_case is not None:
        p.bars("api", "api.png", [(f"clients{c}_tokens_per_s", f"{c} clients") for c in api_case.get("levels", [])],
               "tokens/s", f"API tokens/s vs concurrent clients ({p.mach})")
    chunker = p.ok("chunker")
    if chunker is not None:
        p.bars("chunker", "chunker.png", [(f"{r['key']}_MBps", r["key"]) for r in chunker.get("sources", [])],
               "MB/s written", f"Chunker throughput ({p.mach})")
    p.moe()
    p.scale()
    return p.made
