"""Session fixtures of the mixture-of-experts tests: tiny hub-layout MoE checkpoints, chunked once each."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support import moe
from tests.support.models import chunk


@pytest.fixture(scope="session")
def moe_source(tmp_path_factory):
    """``moe_source(family, layout="single", **config)`` -> a saved checkpoint (built once per arguments)."""
    root = tmp_path_factory.mktemp("moe-src")
    made: dict = {}

    def get(family: str, layout: str = "single", **overrides) -> Path:
        key = (family, layout, tuple(sorted(overrides.items())))
        if key not in made:
            made[key] = moe.build(family, root / f"{family}-{layout}-{len(made)}", layout=layout, **overrides)
        return made[key]

    return get


@pytest.fixture(scope="session")
def moe_chunks(tmp_path_factory, moe_source):
    """``moe_chunks(family, layout="single", experts="units", dtype=None, **config)`` -> (source dir, chunk dir);
    the manifest's name is the family; ``experts="layer"`` keeps experts in their layer's unit; ``dtype`` is the
    chunker's stored dtype (``None``: the checkpoint's)."""
    root = tmp_path_factory.mktemp("moe-chunks")
    made: dict = {}

    def get(family: str, layout: str = "single", experts: str = "units", dtype: str | None = None,
            **overrides) -> tuple[Path, Path]:
        key = (family, layout, experts, dtype, tuple(sorted(overrides.items())))
        if key not in made:
            src = moe_source(family, layout, **overrides)
            out = root / f"{family}-{layout}-{experts}-{len(made)}"
            chunk(src, out, name=family, expert_units=experts == "units", dtype=dtype)
            made[key] = (src, out)
        return made[key]

    return get


@pytest.fixture(scope="session")
def moe_reference():
    """``moe_reference(source, experts_implementation=None)`` -> transformers' model of ``source`` (cached;
    do not switch its implementation, ask for another)."""
    made: dict = {}

    def get(source: Path, experts_implementation: str | None = None):
        key = (str(source), experts_implementation)
        if key not in made:
            made[key] = moe.reference(source, experts_implementation)
        return made[key]

    return get
