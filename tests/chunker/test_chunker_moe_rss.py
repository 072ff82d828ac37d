"""Peak RSS of the chunker on a hub-layout mixture-of-experts checkpoint stays about one layer (issue 25 item 1).

Converting per-expert 2-D tensors into transformers' fused 3-D tensors reads one experts module at a time
(all of its experts), then writes each expert as a unit: the bound is two layers' bytes (the fused tensors
plus the experts being cut out of them), not the model. The model is 8 Mixtral layers of ~12 MiB, so any
reader that held the whole checkpoint (or several layers) blows the bound. Same probe as test_chunker_rss.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import torch

from tests.chunker.test_chunker_rss import _PROBE, SLACK

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")]

LAYERS = 8


def _mixtral(path: Path) -> Path:
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=128, hidden_size=256, intermediate_size=512, num_hidden_layers=LAYERS,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
                        max_position_embeddings=64, tie_word_embeddings=False)
    MixtralForCausalLM(cfg).save_pretrained(str(path))  # the hub layout: experts.E.w1/w2/w3 2-D tensors
    return path


def test_peak_rss_about_one_layer_on_hub_layout_experts(tmp_path):
    src = _mixtral(tmp_path / "src")
    proc = subprocess.run([sys.executable, "-c", _PROBE, str(src), str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    per_layer: dict[str, int] = defaultdict(int)
    for u in manifest["units"]:
        if u["name"].startswith("model.layers."):
            per_layer[".".join(u["name"].split(".")[:3])] += u["bytes"]
    layer = max(per_layer.values())
    assert len(per_layer) == LAYERS and sum(u["role"] == "expert" for u in manifest["units"]) == 8 * LAYERS
    assert r["total"] >= (LAYERS - 1) * layer, r
    growth = r["peak"] - r["base"]
    print(f"peak growth {growth / 2**20:.1f} MiB; one layer {layer / 2**20:.1f} MiB; "
          f"model {r['total'] / 2**20:.0f} MiB")
    assert growth < 2 * layer + SLACK, (
        f"peak RSS grew {growth / 2**20:.1f} MiB over the baseline; bound is 2 x {layer / 2**20:.1f} MiB (one layer) "
        f"+ {SLACK >> 20} MiB (model {r['total'] / 2**20:.0f} MiB)")
