"""The original docs' LLaMA flow: chunk a model, serve the chunks, stream inference.

    python examples/llama_example.py                 # the packaged SmolLM2-135M-Instruct
    python examples/llama_example.py PATH [NAME]     # any local LLaMA-family checkpoint (dir or .gguf)
"""

import asyncio
import sys
import tempfile

import torch

from streaming_weights import ModelChunker, StreamingLlamaModel, WeightServer
from streaming_weights.demo import SMOLLM2_NAME, ensure_demo_chunks


async def main(source: str | None, name: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        # 1. Chunk once: one safetensors file per decoder layer + manifest.json.
        if source is None:
            chunks = str(ensure_demo_chunks(progress=False))
        else:
            chunks = f"{tmp}/{name}"
            result = await ModelChunker(source, output_dir=chunks, name=name).chunk_model()
            print(f"chunked into {result['num_units']} units, {result['total_size_mb']:.1f} MiB")

        # 2. Serve the chunks (normally `surfing serve --chunks-dir DIR` on another machine).
        server = WeightServer(chunks, port=0)
        await server.start()
        try:
            # 3. Stream: only `cache_size` layers (+ prefetch) are held in memory at any time.
            async with StreamingLlamaModel(model_name=name, websocket_uri=f"ws://127.0.0.1:{server.port}",
                                           cache_size=3, prefetch_count=2) as model:
                await model.warmup()
                input_ids = torch.tensor([[1, 2, 3, 4, 5]])
                outputs = await model.forward_async(input_ids=input_ids)
                print("last_hidden_state", tuple(outputs.last_hidden_state.shape))

                if model.tokenizer is not None:
                    enc = model.tokenizer("The capital of France is", return_tensors="pt")
                else:
                    enc = {"input_ids": input_ids}
                tokens = await model.generate_async(**enc, max_new_tokens=8, do_sample=False)
                if model.tokenizer is not None:
                    print(model.tokenizer.decode(tokens[0], skip_special_tokens=True))
                else:
                    print(tokens.tolist())
                info = model.get_cache_info()
                print(f"cache hit rate {info['hit_rate']:.0%}, fetched {info['bytes_fetched'] / 2**20:.1f} MiB")
        finally:
            await server.stop()


if __name__ == "__main__":
    src = sys.argv[1] if len(sys.argv) > 1 else None
    asyncio.run(main(src, sys.argv[2] if len(sys.argv) > 2 else (SMOLLM2_NAME if src is None else "llama-example")))
