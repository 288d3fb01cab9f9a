"""Per-architecture facts for `moe-fusion convert`: the one place architecture-specific knowledge plugs in.

The pipeline (moe_fusion/convert/pipeline.py) asks this module two things:

- `unsupported(config) -> str | None`: why this architecture cannot be converted (one line, said to the user
  with exit 2), or None.
- `prepare(model, config) -> list[contextlib.AbstractContextManager]`: patches active during the trace
  (export branches of the modeling code, traceable replacements of ops without a conversion rule), undone
  when the trace ends.

The survey of transformers' MoE architectures fills these in (docs/converting.md's table); what is here
is the minimum the core pipeline needs.
"""

from __future__ import annotations

import contextlib
from typing import Any

# model_type -> why it cannot be converted. Filled in by the architecture survey.
UNSUPPORTED: dict[str, str] = {}


def unsupported(config: Any) -> str | None:
    """Why `config`'s architecture cannot be converted, or None when the pipeline should try it."""
    return UNSUPPORTED.get(getattr(config, "model_type", ""))


def prepare(model: Any, config: Any) -> list[contextlib.AbstractContextManager]:
    """Context managers entered around the trace of `model` (all exited afterwards, in reverse order)."""
    return []
