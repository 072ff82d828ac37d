"""Child program of the memory tests: one fresh process, peak RSS read from its own ``/proc/self/status``.

    python -m tests.models.memchild CHUNKS OPTIONS_JSON [CGROUP_DIR CAP_BYTES]

With a cgroup it joins it first (writing its own pid, before importing torch), imports what the baseline
holds (torch, transformers' llama modeling and generation code), caps the cgroup at usage + CAP_BYTES,
then builds the model and generates. Prints one JSON line: baseline and peak (VmHWM), the plan, tokens.
"""

from __future__ import annotations

import json
import os
import sys


def status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def main() -> None:
    chunks, opts = sys.argv[1], json.loads(sys.argv[2])
    cgroup = sys.argv[3] if len(sys.argv) > 3 else None
    if cgroup:
        with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))
    import torch
    from transformers.generation import utils  # noqa: F401 - the baseline holds generation code
    from transformers.models.llama import modeling_llama  # noqa: F401 - and the modeling code

    from streaming_weights import StreamingLlamaModel

    if cgroup:
        with open(os.path.join(cgroup, "memory.usage_in_bytes")) as f:
            usage = int(f.read())
        with open(os.path.join(cgroup, "memory.limit_in_bytes"), "w") as f:
            f.write(str(usage + int(sys.argv[4])))
    base = status("VmHWM")
    new_tokens = opts.pop("new_tokens", 8)
    ids = torch.tensor([opts.pop("prompt", [1, 2, 3, 4, 5, 6, 7, 8])])
    model = StreamingLlamaModel(None, chunks, **opts)
    out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False)
    # A second warm-up pass: which fetches overlap which releases depends on timing (a loaded machine sees
    # rarer interleavings), and the pool only grows to the plan's slots as they occur.
    model.generate(ids, max_new_tokens=new_tokens, do_sample=False)
    allocated = model.engine.source.buffer_pool.allocated
    out2 = model.generate(ids, max_new_tokens=new_tokens, do_sample=False)  # steady state
    info = model.get_cache_info()
    plan = model.engine.plan_for(ids.shape[1] + new_tokens, 1)
    print(json.dumps({
        "base": base, "peak": status("VmHWM") - base, "bound": plan.bound_bytes, "plan": plan.as_dict(),
        "tokens": out[0].tolist(), "same": out2[0].tolist() == out[0].tolist(),
        "new_buffers_in_steady_state": model.engine.source.buffer_pool.allocated - allocated,
        "buffers_allocated": model.engine.source.buffer_pool.allocated,
        "buffers_refused": model.engine.source.buffer_pool.refused, "buffers_reused": model.engine.source.buffer_pool.reused,
        "fetches": info["fetches"], "streamed": info["streamed_units"], "cache_size": info["max_cache_size"],
        "load_plan": info["plan"]}))


if __name__ == "__main__":
    main()
