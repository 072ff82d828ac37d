"""Child program of the budget-target tests: one fresh process builds a streaming model under a budget and generates.

    python -m tests.models.budgetchild CHUNKS OPTIONS_JSON MODELING

It imports what the baseline holds first (torch, transformers' generation code and ``modeling_MODELING``: the
process's code, which the plan does not count), then builds the model and generates 16 tokens twice from 8 token ids (with
``"text": true`` in the options, first from a prompt too). Prints one JSON line: the load-time plan, the peak
(VmHWM over the baseline), the file-backed pages first touched meanwhile (library code), anonymous memory now,
the fetches of the first and the second pass, and the kept units.
"""

from __future__ import annotations

import importlib
import json
import sys

from tests.models.memchild import status  # (imports json, os, sys only: the baseline is unchanged)


def main() -> None:
    chunks, opts, modeling = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
    import torch
    from transformers.generation import utils  # noqa: F401 - the baseline holds generation code

    importlib.import_module(f"transformers.models.{modeling}.modeling_{modeling}")
    from streaming_weights import StreamingBaseModel
    from streaming_weights.memory import release_free_heap

    release_free_heap()
    base, anon, files = status("VmHWM"), status("RssAnon"), status("RssFile")
    text = opts.pop("text", False)
    ids = torch.tensor([[2, 17, 33, 40, 9, 41, 7, 12]])
    model = StreamingBaseModel(None, chunks, speculation="off", **opts)
    plan = model.get_cache_info()["plan"]
    if text:
        model.generate_text("what is the capital of france", max_new_tokens=8, do_sample=False)
    new = dict(max_new_tokens=16, min_new_tokens=16, do_sample=False)  # 16 tokens each, whatever they are
    model.generate(ids, **new)
    first = model.get_cache_info()["fetches"]
    model.generate(ids, **new)
    print(json.dumps({
        "plan": plan, "final_plan": model.engine.plan.as_dict(), "peak": status("VmHWM") - base,
        "file_growth": status("RssFile") - files, "anon": status("RssAnon") - anon,
        "first_fetches": first, "second_fetches": model.get_cache_info()["fetches"] - first,
        "kept": model.engine.cache.max_units, "tokenizer_built": model._loaded.lazy_tokenizer.built}))


if __name__ == "__main__":
    main()
