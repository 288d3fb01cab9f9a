"""Running exported LLM fixtures the way users do: a prefill, then decode steps with the KV cache."""

from __future__ import annotations

import numpy as np
import openvino as ov

import moe_fusion

F32 = {"INFERENCE_PRECISION_HINT": "f32"}


def _inputs(model: ov.Model, ids: np.ndarray, past: int) -> dict[str, np.ndarray]:
    feeds = {}
    for param in model.get_parameters():
        name = param.get_friendly_name()
        if name == "input_ids":
            feeds[name] = ids
        elif name == "attention_mask":
            feeds[name] = np.ones((1, past + ids.shape[1]), np.int64)
        elif name == "position_ids":
            feeds[name] = np.arange(past, past + ids.shape[1], dtype=np.int64)[None]
        elif name == "beam_idx":
            feeds[name] = np.zeros(1, np.int32)
        else:
            raise ValueError(f"unexpected model input {name}")
    return feeds


def generate_logits(model: ov.Model, vocab: int, prompt: int = 12, steps: int = 3, seed: int = 0) -> list[np.ndarray]:
    """Logits of a random prompt's prefill and of `steps` decode steps (greedy), f32 on CPU."""
    request = moe_fusion.core().compile_model(model, "CPU", F32).create_infer_request()
    request.reset_state()
    ids = np.random.default_rng(seed).integers(0, vocab, (1, prompt))
    past, outs = 0, []
    for _ in range(steps + 1):
        logits = request.infer(_inputs(model, ids, past))["logits"].copy()
        outs.append(logits)
        past += ids.shape[1]
        ids = logits[:, -1:].argmax(-1).astype(np.int64)
    return outs
