"""Issue 27: a Hugging Face checkpoint folder served as it is (no chunk step, no second copy).

Tiny fixed-seed checkpoints of three families (a dense LLaMA sharded by ``save_pretrained(max_shard_size=...)``,
a Mixtral in the hub layout, sharded too, and a BERT encoder) sit next to a chunked GPT-2 in one directory. Served
over ws:// and read from the folder directly, they give transformers' own outputs; their manifest is the one
``surfing chunk`` writes for the same folder; the folders are byte-identical afterwards and nothing near a
model's size is written anywhere.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
from pathlib import Path

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM

from streaming_weights import StreamingBaseModel, StreamingBertModel, StreamingLlamaModel
from streaming_weights.checkpoint import CheckpointModel, open_checkpoints
from streaming_weights.client import open_unit_source
from streaming_weights.storage import open_storage
from tests.support import models as tiny
from tests.support import moe
from tests.support.models import SEED, chunk
from tests.support.streaming import served

# one worker runs the whole module, in order (make test: -n 2 --dist loadgroup): the tests share the checkpoints
# and their index, and the last one checks what all of them left behind
pytestmark = pytest.mark.xdist_group("checkpoint_serving")

IDS = torch.tensor([[1, 5, 9, 23, 7, 3, 11, 4]])
LLAMA, MIXTRAL, BERT, GPT2 = "tiny-llama", "tiny-mixtral", "tiny-bert", "tiny-gpt2"


def sharded_llama(path: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(SEED)
    cfg = LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0,
                      bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).eval().save_pretrained(str(path), max_shard_size="100KB")
    assert len(list(path.glob("*.safetensors"))) > 2 and (path / "model.safetensors.index.json").is_file()
    return path


def digest_tree(root: Path) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under ``root``."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """(models dir, index root, digests of every file in it before any test served it)."""
    root = tmp_path_factory.mktemp("asis")
    models = root / "models"
    sharded_llama(models / LLAMA)
    moe.build("mixtral", models / MIXTRAL, layout="sharded")
    tiny.bert(models / BERT, layers=2)
    chunk(tiny.gpt2(root / "src" / GPT2, layers=2), models / GPT2)  # a chunked model beside them
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SURFING_CACHE_DIR", str(root / "cache"))  # the default index root: cache dir's index/
        yield models, root / "cache" / "index", digest_tree(models)


def reference(path: Path):
    cls = AutoModel if path.name == BERT else AutoModelForCausalLM
    return cls.from_pretrained(str(path), dtype=torch.float32).eval()


async def hosted(uri: str) -> list[str]:
    source = open_unit_source(uri)
    try:
        return await source.list_models()
    finally:
        await source.close()


def check_parity(where: str, models: Path) -> None:
    """The three checkpoints streamed from ``where`` give transformers' outputs for the same folder."""
    with torch.no_grad():
        with StreamingLlamaModel(model_name=LLAMA, websocket_uri=where, cache_size=0, prefetch_count=1) as m:
            assert torch.equal(m.hf_model(input_ids=IDS).logits, reference(models / LLAMA)(IDS).logits)
        with StreamingBertModel(model_name=BERT, websocket_uri=where) as m:
            got = m.hf_model(input_ids=IDS).last_hidden_state
            assert torch.equal(got, reference(models / BERT)(input_ids=IDS).last_hidden_state)
        ref = reference(models / MIXTRAL)
        with StreamingBaseModel(MIXTRAL, where, cache_size=0, prefetch_count=0, speculation="off") as m:
            torch.testing.assert_close(m.hf_model(moe.IDS).logits, ref(moe.IDS).logits, rtol=0, atol=1e-5)
            want = ref.generate(input_ids=moe.IDS, max_new_tokens=4, do_sample=False)
            assert torch.equal(m.generate(input_ids=moe.IDS, max_new_tokens=4, do_sample=False), want)


def test_served_as_is_over_ws_beside_a_chunked_model(store):
    models, index, _ = store
    with served(models, token="") as uri:
        assert asyncio.run(hosted(uri)) == sorted([LLAMA, MIXTRAL, BERT, GPT2])
        check_parity(uri, models)
        with StreamingBaseModel(GPT2, uri, cache_size=0) as m:  # the chunked one, from the same server
            assert m.hf_model(input_ids=IDS).logits.shape[-1] == 250
    assert sorted(p.name for p in index.iterdir()) and not list(models.rglob("manifest.json"))[1:]


def test_streamed_from_the_folder_directly(store):
    models, _, _ = store
    check_parity(str(models), models)  # the directory of several, by name
    with StreamingLlamaModel(websocket_uri=str(models / LLAMA), cache_size=0) as m:  # one checkpoint folder
        assert m.model_name == LLAMA
        assert torch.equal(m.hf_model(input_ids=IDS).logits, reference(models / LLAMA)(IDS).logits)


@pytest.mark.parametrize("name", [LLAMA, MIXTRAL])
def test_the_manifest_is_the_one_surfing_chunk_writes(store, tmp_path, name):
    """Clients cannot tell the difference: same records, same unit hashes (so the same unit bytes)."""
    models, _, _ = store
    storage, _ = open_storage(models)
    served_bytes = asyncio.run(storage.load(f"{name}/manifest.json"))
    chunk(models / name, tmp_path / "chunked")
    assert served_bytes == (tmp_path / "chunked" / "manifest.json").read_bytes()
    unit = json.loads(served_bytes)["units"][1]
    assert asyncio.run(storage.load(f"{name}/{unit['path']}")) == (tmp_path / "chunked" / unit["path"]).read_bytes()


def test_plain_units_are_ranges_of_the_files_and_converted_ones_are_produced(store):
    """A unit with no conversion is read by range from the original files; MoE experts merged from the hub's
    per-expert tensors are produced. Every range of every unit is the same bytes as the whole unit."""
    models, _, _ = store
    storage = open_checkpoints(models)
    for name, plain, converted in [(LLAMA, "model.layers.0", None), (MIXTRAL, "model.layers.0", True)]:
        manifest = json.loads(asyncio.run(storage.load(f"{name}/manifest.json")))
        model = storage.model(name)
        assert model._pieces(plain) is not None
        experts = [u["name"] for u in manifest["units"] if u.get("role") == "expert"]
        assert bool(experts) == bool(converted) and all(model._pieces(u) is None for u in experts)
        for unit in manifest["units"]:
            key = f"{name}/{unit['path']}"
            whole = asyncio.run(storage.load(key))
            assert hashlib.sha256(whole).hexdigest() == unit["sha256"]
            step = max(1, unit["bytes"] // 3 + 1)
            parts = [asyncio.run(storage.read_range(key, at, step)) for at in range(0, unit["bytes"], step)]
            assert b"".join(parts) == whole, key


def test_served_in_small_ranges_past_the_byte_cache(store):
    from streaming_weights.server.options import ServerLimits

    models, _, _ = store
    with served(models, token="", max_cached_blob_mb=0, limits=ServerLimits(chunk_bytes=7000)) as uri:
        check_parity(uri, models)


def test_the_index_is_reused_and_a_changed_file_is_indexed_again(store, tmp_path, caplog):
    models, _, _ = store
    folder = sharded_llama(tmp_path / "copy" / LLAMA)
    first = CheckpointModel(folder, tmp_path / "idx").manifest_bytes()
    caplog.set_level(logging.INFO, logger="streaming_weights.checkpoint")
    shared = CheckpointModel(folder, tmp_path / "idx")  # another server sharing the index
    assert shared.manifest_bytes() == first
    assert "indexing" not in caplog.text
    for unit in json.loads(first)["units"]:  # read by range as the index says: no plan built, no tensor converted
        assert hashlib.sha256(shared.read(unit["path"])).hexdigest() == unit["sha256"]
    assert shared._plan is None
    weights = sorted(folder.glob("*.safetensors"))[1]
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # touched only
    model = CheckpointModel(folder, tmp_path / "idx")
    assert model.manifest_bytes() == first and "indexing" in caplog.text
    data = bytearray(weights.read_bytes())
    data[-4:] = bytes(4 - i for i in range(4))  # the last weight's bytes change, the size and header do not
    weights.write_bytes(bytes(data))
    again = model.manifest_bytes()  # the same object sees the change before serving anything
    assert again != first
    changed = [u["name"] for u, v in zip(json.loads(again)["units"], json.loads(first)["units"]) if u != v]
    assert len(changed) == 1, changed


def test_truncated_corrupted_overlapping_and_mismatched_folders_fail_alone(store, tmp_path, caplog):
    models, _, _ = store
    root = tmp_path / "mixed"
    good = sharded_llama(root / "good")
    bad = {name: sharded_llama(root / name) for name in ("truncated", "corrupted", "overlap", "mismatch")}
    last = sorted(bad["truncated"].glob("*.safetensors"))[-1]
    os.truncate(last, last.stat().st_size - 100)
    first = sorted(bad["corrupted"].glob("*.safetensors"))[0]
    first.write_bytes(b"\xff" * 8 + first.read_bytes()[8:])
    _overlap(sorted(bad["overlap"].glob("*.safetensors"))[0])
    cfg = json.loads((bad["mismatch"] / "config.json").read_text())
    (bad["mismatch"] / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 96}))
    caplog.set_level(logging.WARNING)
    with served(root, token="") as uri:
        with StreamingLlamaModel(model_name="good", websocket_uri=uri, cache_size=0) as m:
            assert torch.equal(m.hf_model(input_ids=IDS).logits, reference(good)(IDS).logits)
    for name, phrase in [("truncated", "truncated"), ("corrupted", "not a safetensors file"),
                         ("overlap", "starts at"), ("mismatch", "shape")]:
        line = next((r.getMessage() for r in caplog.records if f"/{name}" in r.getMessage()), "")
        assert "not serving checkpoint" in line and phrase in line, (name, line)
    from streaming_weights.exceptions import CheckpointError

    with pytest.raises(CheckpointError, match="truncated"):  # a client pointed at that folder alone
        StreamingLlamaModel(websocket_uri=str(bad["truncated"]), cache_size=0).ensure_loaded()


def test_a_checkpoint_truncated_while_served_fails_alone(tmp_path):
    """A file cut short under a running server: that model's reads fail with a clear error, the next listing
    withdraws it, and the server keeps serving the other model."""
    from streaming_weights.exceptions import StreamingWeightsError

    good, victim = sharded_llama(tmp_path / "good"), sharded_llama(tmp_path / "victim")

    async def run(uri: str) -> list[str]:
        source = open_unit_source(uri)
        try:
            manifest = await source.get_manifest("victim")
            last = sorted(victim.glob("*.safetensors"))[-1]
            os.truncate(last, last.stat().st_size - 100)
            with pytest.raises(StreamingWeightsError, match="truncated"):
                await source.fetch_unit(manifest, manifest.streamed[-1].name)
            return await source.list_models()
        finally:
            await source.close()

    with served(tmp_path, token="") as uri:
        assert asyncio.run(run(uri)) == ["good"]
        with StreamingLlamaModel(model_name="good", websocket_uri=uri, cache_size=0) as m:
            assert torch.equal(m.hf_model(input_ids=IDS).logits, reference(good)(IDS).logits)


def _overlap(path: Path) -> None:
    """Make the second tensor of ``path``'s header start inside the first (same header length)."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    names = [k for k in header if k != "__metadata__"]
    a, b = sorted(names, key=lambda k: header[k]["data_offsets"][0])[:2]
    header[b]["data_offsets"] = [header[b]["data_offsets"][0] - 4, header[b]["data_offsets"][1] - 4]
    text = json.dumps(header, separators=(",", ":")).encode()
    assert len(text) <= n
    path.write_bytes(raw[:8] + text.ljust(n) + raw[8 + n:])


def test_signed_beside_the_index_and_verified_by_clients(store, tmp_path):
    from streaming_weights.exceptions import SignatureError
    from streaming_weights.format.signing import load_private_key, sign_model, write_keypair

    models, index, before = store
    key, pub = write_keypair(tmp_path / "key")
    _, other = write_keypair(tmp_path / "other")
    storage = open_checkpoints(models)
    asyncio.run(sign_model(storage, LLAMA, load_private_key(key)))
    assert (CheckpointModel(models / LLAMA).index_dir / "manifest.json.sig").is_file()
    assert digest_tree(models) == before  # nothing written into the folder
    for where in (str(models),):
        with StreamingLlamaModel(model_name=LLAMA, websocket_uri=where, cache_size=0, trusted_keys=[str(pub)]) as m:
            assert torch.equal(m.hf_model(input_ids=IDS).logits, reference(models / LLAMA)(IDS).logits)
        with pytest.raises(SignatureError):
            StreamingLlamaModel(model_name=LLAMA, websocket_uri=where, trusted_keys=[str(other)]).ensure_loaded()
    with served(models, token="") as uri:
        with StreamingLlamaModel(model_name=LLAMA, websocket_uri=uri, cache_size=0, trusted_keys=[str(pub)]) as m:
            m.ensure_loaded()
        with pytest.raises(SignatureError):
            StreamingLlamaModel(model_name=LLAMA, websocket_uri=uri, trusted_keys=[str(other)]).ensure_loaded()


def test_a_checkpoint_beside_its_chunked_copy_is_served_once_from_the_copy(tmp_path):
    src = tiny.llama(tmp_path / "llama", layers=2)
    chunk(src, tmp_path / "llama-chunks")  # named "llama" too, its source the folder
    with served(tmp_path, token="") as uri:
        assert asyncio.run(hosted(uri)) == ["llama"]
        with StreamingLlamaModel(model_name="llama", websocket_uri=uri, cache_size=0) as m:
            assert torch.equal(m.hf_model(input_ids=IDS).logits, reference(src)(IDS).logits)


def test_surfing_serve_and_sign_a_checkpoint_folder(store, tmp_path, capfd):
    """The real command: ``surfing serve DIR --index-dir`` in its own process; ``surfing keygen`` and ``surfing sign
    FOLDER --index-dir`` through the same ``cli.main`` in this one."""
    from streaming_weights.exceptions import SignatureError
    from tests.cli.helpers import surfing_here
    from tests.support.servers import start_server_process

    models, _, before = store
    index = tmp_path / "index"
    res = surfing_here(capfd, "keygen", "--out", tmp_path / "key")
    assert res.returncode == 0, res.stderr
    res = surfing_here(capfd, "sign", models / LLAMA, "--key", tmp_path / "key", "--index-dir", index)
    assert res.returncode == 0 and str(index) in res.stdout, (res.stdout, res.stderr)
    proc, port = start_server_process(models, "--index-dir", str(index))
    try:
        uri = f"ws://127.0.0.1:{port}"
        with StreamingLlamaModel(model_name=LLAMA, websocket_uri=uri, cache_size=0,
                                 trusted_keys=[str(tmp_path / "key.pub")]) as m:
            assert torch.equal(m.hf_model(input_ids=IDS).logits, reference(models / LLAMA)(IDS).logits)
        with pytest.raises(SignatureError):  # the default index holds no signature by that key
            StreamingLlamaModel(model_name=LLAMA, websocket_uri=str(models),
                                trusted_keys=[str(tmp_path / "key.pub")]).ensure_loaded()
    finally:
        proc.terminate()
        proc.wait(30)
    assert {p.name for p in index.rglob("*") if p.is_file()} == {"index.json", "manifest.json", "manifest.json.sig"}
    assert digest_tree(models) == before


def test_surfing_serve_on_one_broken_checkpoint_says_why_in_one_line(tmp_path, capfd):
    from tests.cli.helpers import assert_one_line_error, surfing_here

    folder = sharded_llama(tmp_path / "cut")
    last = sorted(folder.glob("*.safetensors"))[-1]
    os.truncate(last, last.stat().st_size - 100)
    res = surfing_here(capfd, "serve", folder, "--port", "0", "--index-dir", tmp_path / "index")
    assert_one_line_error(res, "cannot serve", last.name, "truncated")


@pytest.mark.s3
def test_streamed_and_served_from_s3(store, s3_server, s3_bucket, monkeypatch):
    """The same folders uploaded as they are to the real S3 server: streamed from ``s3://`` by ranged reads, and
    served by a weight server over that storage."""
    models, _, before = store
    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    backend = s3_server.backend(s3_bucket, "hub")

    async def upload() -> None:
        for name in (LLAMA, MIXTRAL, BERT):
            for p in sorted((models / name).rglob("*")):
                if p.is_file():
                    await backend.save(f"{name}/{p.relative_to(models / name)}", p.read_bytes())
        await backend.close()

    asyncio.run(upload())
    check_parity(f"s3://{s3_bucket}/hub", models)
    with served(f"s3://{s3_bucket}/hub", token="") as uri:
        assert asyncio.run(hosted(uri)) == sorted([LLAMA, MIXTRAL, BERT])
        check_parity(uri, models)
    stored = [o["Key"] for o in s3_server.client().list_objects_v2(Bucket=s3_bucket)["Contents"]]
    assert len(stored) > 10 and not [k for k in stored if "manifest" in k or "/units/" in k]  # nothing written there
    assert digest_tree(models) == before


def test_the_folders_are_untouched_and_nothing_near_a_model_was_written(store):
    """Runs last in this module: every file is as it was, and the index holds manifests, not weights."""
    models, index, before = store
    assert digest_tree(models) == before
    smallest = min(tree_bytes(models / n) for n in (LLAMA, MIXTRAL, BERT))
    folders = [d for d in index.iterdir() if d.is_dir()]
    assert len(folders) >= 3 and all(0 < tree_bytes(d) < smallest / 4 for d in folders), \
        ([tree_bytes(d) for d in folders], smallest)  # one index per folder served: manifests, no unit bytes
    assert {p.name for p in index.rglob("*") if p.is_file()} <= {"index.json", "manifest.json", "manifest.json.sig"}
