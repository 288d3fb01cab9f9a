"""Everything the fuzzer takes from the engine, in one place: the engine's modules move (issue 18's tiers),
and only this file then needs to follow them. Public names first; internal helpers only where no public
one exists (the candidate finder, the family catalogue, the weight and layout helpers)."""

from __future__ import annotations

import moe_fusion
from moe_fusion import catalogue
from moe_fusion.candidates import candidates
from moe_fusion.compare import compare
from moe_fusion.compressed import DECOMPRESSION, is_weight
from moe_fusion.io import InputError, first_line
from moe_fusion.isolate import Worker, WorkerCrash
from moe_fusion.pattern import strip

check = moe_fusion.check
core = moe_fusion.core
fuse = moe_fusion.fuse
read_model = moe_fusion.read_model


def find_blocks(model):
    """The MoE blocks the engine's families match in `model` (MoEBlock objects), sorted by name."""
    blocks, _misses = candidates(model, catalogue.load())
    return sorted(blocks, key=lambda b: b.name)


def broken_findings(model) -> str:
    """'' for a sound export, else the engine's one-line summary of why `model` is a broken export."""
    from moe_fusion import broken

    found = broken.findings(model)
    return broken.summary(found) if found else ""


def reference_sides(model, block_name: str, same_block):
    """The block of `model` named like `block_name` cut out as (original, fused) sub-models, or None."""
    from moe_fusion.proof import cut
    from moe_fusion.rewrite import build

    block = next((b for b in find_blocks(model) if same_block(b.name, block_name)), None)
    if block is None:
        return None
    try:
        _fused, replacement = build(block)
        sides = cut(block, replacement, forced=False)
    except (ValueError, RuntimeError):
        return None
    return sides.original, sides.replacement


def token_shape(partial, tokens: int) -> list[int]:
    from moe_fusion.inputs import token_shape as shape

    return shape(partial, tokens)


def f32_config() -> dict:
    from moe_fusion.runtime import F32

    return F32


# check(progress=True) says on stderr which side runs: "moe-fusion: original: ..." / "moe-fusion: fused: ..."
PROGRESS_PREFIX = "moe-fusion: "

__all__ = ["DECOMPRESSION", "InputError", "Worker", "WorkerCrash", "compare", "first_line", "is_weight", "strip"]
