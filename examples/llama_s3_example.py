"""Scale-out: chunk a LLaMA model into an S3 bucket, serve it with two servers sharing a Redis cache,
and stream it from a client that knows both servers (it fails over if one goes away).

    python examples/llama_s3_example.py --bucket my-bucket [--prefix models/llama] [--model PATH]
        [--endpoint-url URL] [--access-key K --secret-key S] [--redis-url redis://host:6379/0] [--check]

Credentials and endpoint default to the standard AWS variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_SESSION_TOKEN, AWS_ENDPOINT_URL, AWS_DEFAULT_REGION); the Redis URL to $REDIS_URL. The bucket must
exist. Without --model the packaged SmolLM2-135M-Instruct GGUF is used. In production the two servers
are separate processes or hosts (`surfing serve --s3-bucket B --s3-prefix P --redis-url URL`), usually
behind a TCP load balancer; here they run in this process to keep the example self-contained.
"""

from __future__ import annotations

import argparse
import asyncio
import os

import torch

from streaming_weights import ModelChunker, StreamingLlamaModel
from streaming_weights.server import AdvancedWeightServer
from streaming_weights.storage.s3 import S3Backend


def s3_backend(args: argparse.Namespace) -> S3Backend:
    return S3Backend(args.bucket, args.prefix, aws_access_key_id=args.access_key,
                     aws_secret_access_key=args.secret_key, region_name=args.region, endpoint_url=args.endpoint_url)


async def main(args: argparse.Namespace) -> None:
    source, name = args.model, args.name
    if source is None:
        from streaming_weights.demo import SMOLLM2_NAME, packaged_smollm2

        source, name = str(packaged_smollm2()), name or SMOLLM2_NAME
    name = name or "llama-s3-example"

    # 1. Chunk once, straight into the bucket (manifest.json is written last).
    result = await ModelChunker(source, storage_backend=s3_backend(args), name=name).chunk_model()
    print(f"chunked {name!r} into {result['num_units']} units -> {result['storage']}")

    # 2. Two servers over the same bucket, sharing one Redis cache of unit bytes.
    servers = AdvancedWeightServer(storage_backend=s3_backend(args), redis_url=args.redis_url, port=args.port,
                                   num_servers=2)
    async with servers:
        print("servers:", " ".join(servers.uris))
        # 3. A client with the server list: a request that fails on one server completes on the other.
        async with StreamingLlamaModel(name, websocket_uri=servers.uris, cache_size=2, prefetch_count=2) as model:
            if model.tokenizer is not None:
                enc = dict(model.tokenizer("The capital of France is", return_tensors="pt"))
            else:
                enc = {"input_ids": torch.tensor([[1, 5, 17, 33, 2, 9]])}
            tokens = await model.generate_async(**enc, max_new_tokens=args.max_new_tokens, do_sample=False)
            if model.tokenizer is not None:
                print(model.tokenizer.decode(tokens[0], skip_special_tokens=True))
            else:
                print(tokens.tolist())
        s3_stats = servers.storage.inner.stats  # the chain is RedisCacheBackend -> S3Backend
        print(f"S3 GETs across both servers: {s3_stats['get_requests']} ({s3_stats['get_bytes']} bytes); "
              f"Redis: {servers.storage.stats}")

    if args.check:  # compare with transformers loading the original checkpoint (an HF directory)
        from transformers import AutoModelForCausalLM

        ref = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
        with torch.no_grad():
            want = ref.generate(**enc, max_new_tokens=args.max_new_tokens, do_sample=False)
        print(f"identical to transformers: {torch.equal(tokens, want)}")


def parse_args() -> argparse.Namespace:
    env = os.environ.get
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bucket", default=env("SURFING_S3_BUCKET"), required=env("SURFING_S3_BUCKET") is None)
    p.add_argument("--prefix", default="models/llama", help="folder in the bucket for this model")
    p.add_argument("--model", default=None, help="HF checkpoint dir / .safetensors / .gguf (default: packaged SmolLM2)")
    p.add_argument("--name", default=None, help="model name in the manifest")
    p.add_argument("--endpoint-url", default=env("AWS_ENDPOINT_URL"), help="S3-compatible endpoint (default $AWS_ENDPOINT_URL)")
    p.add_argument("--region", default=env("AWS_DEFAULT_REGION"))
    p.add_argument("--access-key", default=None, help="default: $AWS_ACCESS_KEY_ID / profile / instance role")
    p.add_argument("--secret-key", default=None, help="default: $AWS_SECRET_ACCESS_KEY")
    p.add_argument("--redis-url", default=env("REDIS_URL", "redis://localhost:6379/0"))
    p.add_argument("--port", type=int, default=0, help="first server's port (0: any free ports)")
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--check", action="store_true", help="compare with transformers on the original checkpoint")
    return p.parse_args()


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
