"""Model inputs generated from a model's own Parameters: LLM inputs by name (`input_ids`, `attention_mask`,
`position_ids`, `beam_idx`, `token_type_ids`), anything else random by element type and shape; and the
concrete shape of a dynamic input for a token count."""

from __future__ import annotations

import numpy as np
import openvino as ov

from moe_fusion.graph import output_name
from moe_fusion.io import InputError

LLM_INPUTS = ("input_ids", "attention_mask", "position_ids", "beam_idx", "token_type_ids")


def llm_feed(name: str, param: ov.Node, ids: np.ndarray, past: int) -> np.ndarray:
    """An LLM input by name for token `ids` [batch, n] after `past` tokens."""
    dtype = param.get_element_type().to_dtype()
    batch, length = ids.shape
    if name == "input_ids":
        return ids.astype(dtype)
    if name == "attention_mask":
        return np.ones((batch, past + length), dtype)
    if name == "position_ids":
        positions = np.broadcast_to(np.arange(past, past + length, dtype=dtype), (batch, length))
        rank = param.get_partial_shape().rank
        if rank.is_static and rank.get_length() == 3:  # multimodal rope: [3, B, S]
            return np.ascontiguousarray(np.broadcast_to(positions, (3, batch, length)))
        return np.ascontiguousarray(positions)
    if name == "beam_idx":
        return np.zeros(batch, dtype)
    return np.zeros((batch, length), dtype)  # token_type_ids


def token_shape(partial: ov.PartialShape, tokens: int) -> list[int]:
    """Concrete shape: the last dynamic dim gets the tokens, other dynamic dims 1 (batch)."""
    dims = [d.get_length() if d.is_static else None for d in partial]
    dynamic = [i for i, d in enumerate(dims) if d is None]
    for i in dynamic:
        dims[i] = tokens if i == dynamic[-1] else 1
    return dims


def random_feed(param: ov.Node, tokens: int, rng: np.random.Generator) -> np.ndarray:
    """Random data of the input's type for `tokens` tokens (a stateless KV cache: empty)."""
    partial = param.get_partial_shape()
    name = output_name(param.output(0))
    if partial.rank.is_dynamic:
        raise InputError(f"input '{name}' has dynamic rank: cannot generate data for it")
    shape = token_shape(partial, tokens)
    if name.startswith(("past_key_values", "past.")):  # stateless KV cache: batch 1, empty past
        dynamic = [i for i, d in enumerate(partial) if d.is_dynamic]
        shape = [0 if i in dynamic[1:] else d for i, d in enumerate(shape)]
    dtype = param.get_element_type().to_dtype()
    if dtype == np.bool_:
        return rng.random(shape) < 0.5
    if np.issubdtype(dtype, np.integer):
        return rng.integers(0, 8, shape).astype(dtype)
    return rng.standard_normal(shape).astype(dtype)


def step_feeds(params: dict[str, ov.Node], llm: bool, ids: np.ndarray | None, past: int, count: int,
               rng: np.random.Generator) -> dict[str, np.ndarray]:
    """One step's inputs by name: LLM inputs for token `ids` after `past` tokens, others random for `count`."""
    return {
        name: llm_feed(name, param, ids, past) if llm and name in LLM_INPUTS else random_feed(param, count, rng)
        for name, param in params.items()
    }

