"""Per-architecture facts for `moe-fusion convert`: the one place architecture-specific knowledge plugs in.

The pipeline (moe_fusion/convert/pipeline.py) asks this module two things:

- `unsupported(config) -> str | None`: why this architecture cannot be converted (one line, said to the user
  with exit 2), or None.
- `prepare(model, config) -> list[contextlib.AbstractContextManager]`: patches active during the trace,
  undone when the trace ends.

What is here, and why (docs/converting.md has the table of every MoE architecture of transformers 5.23,
produced by models/sweep_convert.py):

- Sliding-window attention must survive openvino-genai's default backend. `LLMPipeline` on CPU rewrites every
  SDPA into PagedAttention (OpenVINO's SDPAToPagedAttention) and drops the traced mask: PagedAttention is
  causal by construction and takes the window as a number, which the rewrite reads from the mask only when
  the mask has one of two shapes it knows (state_management_pattern.cpp: Phi-3's, and GPT-OSS's
  `Slice(Select(Broadcast(BitwiseAnd^4(... Greater(kv, Add(q, -window)) ...))))`, the shape optimum-intel's
  exports have). transformers 5.23 traces its sliding mask as a boolean `Broadcast(BitwiseAnd^4(...))` with no
  Select and no Slice, so the window was lost: wrong tokens from the first one past the window, right with
  `ATTENTION_BACKEND="SDPA"`. `patches.paged_attention_sliding_masks` builds the sliding layers' mask in the
  GPT-OSS shape (same values), so the window reaches PagedAttention.
- Architectures whose cache holds more than keys and values, or whose attention PagedAttention cannot
  express, are refused by name (below): a converted folder that genai runs wrong is worse than none.
"""

from __future__ import annotations

import contextlib
from typing import Any

from moe_fusion.convert import patches

# Recurrent state the converted cache does not carry (the trace holds keys/values only). Each would need its
# conv/SSM/linear-attention state as ReadValue/Assign pairs, and a single traced graph for both prefill and
# decode (their modeling code branches in Python on `has_previous_state` / `seq_len == 1`, which a trace
# freezes), and openvino-genai's PagedAttention rewrite to leave those states alone.
_RECURRENT = {
    "qwen3_next": "Gated DeltaNet linear-attention layers (conv and recurrent state; the chunked prefill also "
                  "reaches torch.linalg.solve_triangular, which has no OpenVINO conversion rule)",
    "qwen3_5_moe": "Gated DeltaNet linear-attention layers (conv and recurrent state; the chunked prefill also "
                   "reaches torch.linalg.solve_triangular, which has no OpenVINO conversion rule)",
    "kimi_linear": "Kimi Delta Attention linear-attention layers (short-conv and recurrent state)",
    "jamba": "Mamba layers (conv and SSM state)",
    "nemotron_h": "Mamba-2 layers (conv and SSM state)",
    "granitemoehybrid": "Mamba-2 layers (conv and SSM state)",
    "lfm2_moe": "short-convolution layers (conv state)",
    "bailing_hybrid": "delta-attention linear layers (recurrent state)",
    "qwen4_exp": "Gated DeltaNet linear-attention layers (conv and recurrent state) and its sparse-attention "
                 "indexer",
    "minimax": "lightning linear-attention layers (recurrent state)",
}

# DeepSeek sparse attention: an indexer picks the top-k keys per query and attention masks the rest. The
# indexer keys are a third cache tensor per layer, and PagedAttention has no input for a per-query key
# selection: under genai's default backend the model would attend to every key, which equals DSA only while
# the context is no longer than the indexer's top-k (2048 for the released checkpoints), then silently differs.
_SPARSE = ("DeepSeek sparse attention (an indexer selects the top-k keys per query from a cache of indexer "
           "keys; openvino-genai's PagedAttention has no per-query key selection, so the deployed model would "
           "attend to all keys past the indexer's top-k)")
_SPARSE_ATTENTION = {"deepseek_v32": _SPARSE, "glm_moe_dsa": _SPARSE, "hy_v4": _SPARSE, "axk2": _SPARSE,
                     "dots3_note": _SPARSE, "minimax_m3_vl": _SPARSE}

# DeepSeek-V4: hybrid compressed attention. Its cache layers (HCA / CSA) hold, beside a sliding window of keys,
# compressor and indexer state that grows in blocks, and the CSA layers select compressed blocks per query with
# an indexer: neither is a key/value pair OpenVINO's stateful cache or PagedAttention can hold or express.
_COMPRESSED = ("DeepSeek-V4's compressed attention (HCA/CSA cache layers hold compressor and indexer state beside "
               "the keys, and CSA selects compressed blocks per query; openvino-genai's PagedAttention has neither)")

# Routing a trace freezes (docs/converting.md, "Architectures whose trace is wrong whatever the switch"): the
# converted model would run only inputs routed like the example. The conversion proof catches it (the logits
# differ), but by name is clearer than a failed proof.
_FROZEN = {
    "jetmoe": "its experts split the routed rows with sizes taken by .tolist(), which the trace freezes",
    "longcat_flash": "its router turns expert ids into Python numbers (.item()), which the trace freezes",
}

UNSUPPORTED: dict[str, str] = {
    "deepseek_v4": f"not supported: {_COMPRESSED}",
    # Chunked local attention: openvino-genai's PagedAttention has a sliding window but no chunks, and drops the
    # traced chunk mask, so past attention_chunk_size tokens (8192 in the releases) the deployed model would differ.
    "llama4": "not supported: chunked local attention (attention_chunk_size) has no openvino-genai PagedAttention "
              "equivalent; the deployed model would differ past the chunk size",
    **{kind: f"not supported: {why}" for kind, why in _FROZEN.items()},
    **{kind: f"not supported: its {what} are not carried by the converted KV cache"
       for kind, what in _RECURRENT.items()},
    **{kind: f"not supported: {why}" for kind, why in _SPARSE_ATTENTION.items()},
}


def _text_config(config: Any) -> Any:
    getter = getattr(config, "get_text_config", None)
    return getter(decoder=True) if getter else config


def _frozen_split_sizes(kind: str) -> str | None:
    """transformers 5.5 GraniteMoE(-shared) experts (`ParallelExperts`) split the routed rows with
    `expert_size.tolist()`: the trace freezes the sizes. 5.23 routes them through the experts switch instead.
    Read from the installed modeling code, so the answer follows the transformers version."""
    import importlib
    import inspect

    try:
        module = importlib.import_module(f"transformers.models.{kind}.modeling_{kind}")
        source = inspect.getsource(module)
    except (ImportError, OSError, TypeError):
        return None
    if "expert_size = expert_size.tolist()" in source:
        return ("not supported with this transformers version: its experts split the routed rows with sizes "
                "taken by .tolist(), which the trace freezes (with transformers 5.23 it converts; optimum-intel "
                "patches it)")
    return None


def unsupported(config: Any) -> str | None:
    """Why `config`'s architecture cannot be converted (one line), or None when the pipeline should try it."""
    for kind in (getattr(config, "model_type", ""), getattr(_text_config(config), "model_type", "")):
        # a multimodal family's text model has its own model_type: qwen3_5_moe_text for Qwen3_5MoeForCausalLM
        reason = UNSUPPORTED.get(kind) or UNSUPPORTED.get(kind.removesuffix("_text"))
        if reason:
            return reason
    if getattr(config, "model_type", "") in ("granitemoe", "granitemoeshared"):
        return _frozen_split_sizes(config.model_type)
    kinds = getattr(_text_config(config), "layer_types", None) or []
    if getattr(config, "model_type", "") == "afmoe" and kinds and set(kinds) == {"sliding_attention"}:
        # seen: converted and proven equal, right under SDPA, wrong under genai's default PagedAttention
        # although it received the window on every layer (docs/converting.md, "Open"); released AfMoE configs
        # have full layers and are right
        return ("not supported: an AfMoE whose every layer slides generates wrong tokens under openvino-genai's "
                "PagedAttention (not yet explained); configs with a full-attention layer convert")
    return None


def has_sliding_layers(config: Any) -> bool:
    """Whether any layer attends within a sliding window (what the PagedAttention mask shape matters for)."""
    text = _text_config(config)
    if not getattr(text, "sliding_window", None):
        return False
    if getattr(text, "use_sliding_window", True) is False:
        return False
    kinds = getattr(text, "layer_types", None)
    return kinds is None or "sliding_attention" in kinds


def prepare(model: Any, config: Any) -> list[contextlib.AbstractContextManager]:
    """Context managers entered around the trace of `model` (all exited afterwards, in reverse order)."""
    managers: list[contextlib.AbstractContextManager] = []
    if has_sliding_layers(config):
        managers.append(patches.paged_attention_sliding_masks())
    return managers
