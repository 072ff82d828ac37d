"""Mixture-of-experts bad input (issue 25): an expert unit that fails verification raises UnitUnavailableError,
never a zero or missing expert; a manifest whose expert units disagree with the config is refused at load."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from streaming_weights import StreamingBaseModel
from streaming_weights.exceptions import IntegrityError, ManifestError, UnitUnavailableError

from tests.support.moe import IDS, routed_run
from tests.support.streaming import served


def causes(exc):
    while exc is not None:
        yield exc
        exc = exc.__cause__ or exc.__context__


@pytest.fixture
def mixtral_copy(moe_chunks, tmp_path):
    """A private copy of the chunked tiny Mixtral (tests edit it)."""
    _, chunks = moe_chunks("mixtral")
    return shutil.copytree(chunks, tmp_path / "mixtral")


def test_corrupt_expert_unit_raises_never_zeros(mixtral_copy):
    _, fetched = routed_run(mixtral_copy, "mixtral", IDS[:, :6], 2)
    victim = next(n for n in fetched if ".experts." in n)  # an expert this prompt's router does pick
    path = mixtral_copy / "units" / f"{victim}.safetensors"
    data = bytearray(path.read_bytes())
    data[len(data) - 7] ^= 0x10  # one bit of one weight: the file still parses, only the hash tells
    path.write_bytes(bytes(data))
    with served(mixtral_copy) as uri, StreamingBaseModel("mixtral", uri, cache_size=1, max_retries=1,
                                                         timeout_seconds=10) as m:
        with pytest.raises(UnitUnavailableError, match=victim.replace(".", r"\.")) as ei:
            m.generate(input_ids=IDS[:, :6], max_new_tokens=2, do_sample=False)
        assert any(isinstance(e, IntegrityError) for e in causes(ei.value)), list(causes(ei.value))
        experts = m.hf_model.get_submodule(victim.rsplit(".", 1)[0])
        assert all(p.is_meta for p in experts.parameters(recurse=False))  # nothing half-assigned is left
        assert experts.num_experts == 8


def _edit_manifest(chunks, edit) -> None:
    path = chunks / "manifest.json"
    obj = json.loads(path.read_text())
    edit(obj)
    path.write_text(json.dumps(obj, indent=1))


@pytest.mark.parametrize("experts, match", [
    (6, r"model\.layers\.0\.mlp\.experts.*manifest has 8 experts, the config 6"),
    (12, r"model\.layers\.0\.mlp\.experts.*manifest has 8 experts, the config 12"),
])
def test_config_disagreeing_with_expert_units_is_refused_at_load(mixtral_copy, experts, match):
    _edit_manifest(mixtral_copy, lambda o: o["config"].update(num_local_experts=experts))
    with pytest.raises(ManifestError, match=match):
        StreamingBaseModel("mixtral", str(mixtral_copy), cache_size=1)


def test_last_expert_unit_dropped_is_refused_at_load(mixtral_copy):
    dropped = "model.layers.1.mlp.experts.7"

    def drop(obj):
        obj["units"] = [u for u in obj["units"] if u["name"] != dropped]

    _edit_manifest(mixtral_copy, drop)
    (mixtral_copy / "units" / f"{dropped}.safetensors").unlink()
    with pytest.raises(ManifestError, match=r"model\.layers\.1\.mlp\.experts.*manifest has 7 experts, the config 8"):
        StreamingBaseModel("mixtral", str(mixtral_copy), cache_size=1)


def test_middle_expert_unit_dropped_is_refused_at_load(mixtral_copy):
    dropped = "model.layers.0.mlp.experts.3"
    _edit_manifest(mixtral_copy, lambda o: o.update(units=[u for u in o["units"] if u["name"] != dropped]))
    with pytest.raises(ManifestError,
                       match=r"rows \[3, 4\) of experts module 'model\.layers\.0\.mlp\.experts' are in no expert unit"):
        StreamingBaseModel("mixtral", str(mixtral_copy), cache_size=1)


def test_expert_shapes_disagreeing_with_the_config_are_refused_at_load(mixtral_copy):
    # the experts' inner size lives only in the expert units (the dense part has attention, norms and router)
    _edit_manifest(mixtral_copy, lambda o: o["config"].update(intermediate_size=48))
    match = (r"unit 'model\.layers\.0\.mlp\.experts\.0' stores .* as \[1, (128, 32|32, 64)\], "
             r"the config makes it \[1, (96, 32|32, 48)\]")
    with pytest.raises(ManifestError, match=match):
        StreamingBaseModel("mixtral", str(mixtral_copy), cache_size=1)


def test_good_copy_still_loads(mixtral_copy, moe_chunks, moe_reference):
    """The edits above are what breaks those loads: the untouched copy streams exactly."""
    src, _ = moe_chunks("mixtral")
    with StreamingBaseModel("mixtral", str(mixtral_copy), cache_size=1) as m:
        got = m.generate(input_ids=IDS, max_new_tokens=4, do_sample=False)
    with torch.no_grad():
        assert torch.equal(got, moe_reference(src).generate(input_ids=IDS, max_new_tokens=4, do_sample=False))
