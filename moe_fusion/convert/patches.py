"""Patches to transformers active only while `convert` traces a model (see architectures.py for when).

`paged_attention_sliding_masks`: the sliding-window layers' attention mask built in the shape OpenVINO's
SDPAToPagedAttention reads the window from (src/common/transformations/.../state_management_pattern.cpp,
`gpt_oss_sliding_window_pattern`):

    Slice(Select(Broadcast(BitwiseAnd(BitwiseAnd(x, BitwiseAnd(BitwiseAnd(y, Greater(kv, Add(q, -W))), z)), u)),
                 0, min))

The rewrite takes `-(-W)` as PagedAttention's sliding window and drops the mask; under the SDPA backend (and in
the proof against torch) the mask itself is used, with the same values transformers' mask has. Everything else
(full-attention masks, chunked attention, masks with extra and/or functions) goes to transformers' own mask
functions unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from transformers import masking_utils

_WINDOW = "_moe_fusion_sliding_window"  # tag on the mask functions transformers builds for sliding layers


def sliding_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, attention_mask=None, *, window: int,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Additive `[B, 1, Q, KV]` mask: query at position p sees keys p - window < k <= p that are not padding.

    The four BitwiseAnds, their operand order, the Add of a constant to the query index, the Select and the
    Slice are what the PagedAttention rewrite matches; the extra terms are true everywhere."""
    q = (torch.arange(q_length) + q_offset).view(1, 1, -1, 1)
    kv = (torch.arange(kv_length) + kv_offset).view(1, 1, 1, -1)
    mask = (kv <= q) & (kv > q + (-window))       # BitwiseAnd(causal, Greater(kv, Add(q, -window)))
    if attention_mask is not None:                # BitwiseAnd(., padding)
        padding = attention_mask[:, kv_offset:].to(torch.bool)[:, None, None, :]
        mask = mask & padding[..., :kv_length]
    else:
        mask = mask & (kv >= kv_offset)
    mask = (kv >= kv_offset) & mask               # BitwiseAnd(true, .)
    mask = mask & (q >= q_offset)                 # BitwiseAnd(., true)
    mask = mask.expand(batch_size, 1, q_length, kv_length)
    # a fully masked row (left padding) gets min, not -inf: OpenVINO's SDPA would return NaN for it
    additive = torch.where(mask, torch.tensor(0.0, dtype=dtype), torch.tensor(torch.finfo(dtype).min, dtype=dtype))
    return additive[:, :, :, :kv_length]


@contextlib.contextmanager
def paged_attention_sliding_masks() -> Iterator[None]:
    """transformers' sliding-window masks built by `sliding_mask` while the context is active."""
    interface = masking_utils.ALL_MASK_ATTENTION_FUNCTIONS
    saved = {kind: interface[kind] for kind in ("sdpa", "eager")}
    factory = masking_utils.sliding_window_causal_mask_function

    def tagged(sliding_window, *args, **kwargs):
        function = factory(sliding_window, *args, **kwargs)
        setattr(function, _WINDOW, sliding_window)
        return function

    def wrapped(original):
        def mask(batch_size, q_length=None, kv_length=None, q_offset=0, kv_offset=0, mask_function=None,
                 attention_mask=None, **kwargs):
            window = getattr(mask_function, _WINDOW, None)
            if window is None:  # full attention, chunked attention, or a sliding mask with extra functions
                return original(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                                kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                                **kwargs)
            return sliding_mask(batch_size, q_length, kv_length, q_offset, kv_offset, attention_mask,
                                window=window, dtype=kwargs.get("dtype") or torch.float32)
        return mask

    try:
        masking_utils.sliding_window_causal_mask_function = tagged
        for kind, function in saved.items():
            interface.register(kind, wrapped(function))
        yield
    finally:
        masking_utils.sliding_window_causal_mask_function = factory
        for kind, function in saved.items():
            interface.register(kind, function)
