"""Direct conversion of a transformers 5 MoE model with `openvino.convert_model`, done right (optional:
`pip install "moe-fusion[convert]"`, which brings torch and transformers; the rest of moe-fusion never
imports this module).

    from moe_fusion.convert import convert_model
    ov_model = convert_model(hf_model)          # every expert in the graph; then moe_fusion.fuse(ov_model)

What it does, and why (docs/converting.md):

1. `hf_model.set_experts_implementation("batched_mm")`. transformers 5's default `grouped_mm` does not
   convert (`aten::histc` has no conversion rule); `eager` loops in Python over the experts the example
   input hit, so the IR keeps only those (moe-fusion reports such an IR as a broken export).
2. Two fixes to transformers 5.5's mask code, active only during the trace: a mask function without vmap
   and without the tensor-`q_length` branch, registered for "sdpa" and "eager"; and
   `find_packed_sequence_indices` returning None (it needs `aten::diff`).
3. `forward(input_ids, attention_mask) -> logits` converted with dynamic batch and sequence, no KV cache.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import openvino as ov

try:
    import torch
    from transformers import masking_utils
except ImportError as error:  # keep torch out of the base install
    raise ImportError(
        f"moe_fusion.convert needs torch and transformers ({error.name} is missing): "
        'pip install "moe-fusion[convert]"'
    ) from None

EXPERTS = "batched_mm"


def traceable_sdpa_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0,
                        mask_function=masking_utils.causal_mask_function, attention_mask=None, **_):
    """transformers' `sdpa_mask` minus what does not trace: under `torch.jit.trace` `q_length` is a tensor,
    which `sdpa_mask` takes for a deprecated `cache_position`; and vmap, which it uses for custom mask
    functions. Index-based mask functions broadcast over arange tensors instead. Boolean `[B, 1, Q, KV]`."""
    padding = masking_utils.prepare_padding_mask(attention_mask, kv_length, kv_offset)
    if padding is not None:
        mask_function = masking_utils.and_masks(mask_function, masking_utils.padding_mask_function(padding))
    b = torch.arange(batch_size)[:, None, None, None]
    h = torch.arange(1)[None, :, None, None]
    q = (torch.arange(q_length) + q_offset)[None, None, :, None]
    kv = (torch.arange(kv_length) + kv_offset)[None, None, None, :]
    mask = mask_function(b, h, q, kv).expand(batch_size, -1, q_length, kv_length)
    # A query that may attend to nothing (a left-padding position) attends everywhere instead: OpenVINO's
    # SDPA returns NaN for such rows (torch >= 2.5 returns 0), and the NaN reaches real tokens through V.
    return mask | torch.all(~mask, dim=-1, keepdim=True)


def traceable_eager_mask(*args, dtype=torch.float32, **kwargs):
    """The eager-attention variant: 0 where attended, the dtype's minimum elsewhere."""
    mask = traceable_sdpa_mask(*args, **kwargs)
    return torch.where(mask, torch.tensor(0.0, dtype=dtype), torch.tensor(torch.finfo(dtype).min, dtype=dtype))


@contextlib.contextmanager
def conversion_fixes(mask: bool = True, packed: bool = True) -> Iterator[None]:
    """The two non-MoE fixes transformers 5.5 needs to trace, undone on exit."""
    interface = masking_utils.ALL_MASK_ATTENTION_FUNCTIONS
    saved = {k: interface[k] for k in ("sdpa", "eager")}
    saved_packed = masking_utils.find_packed_sequence_indices
    try:
        if mask:
            interface.register("sdpa", traceable_sdpa_mask)
            interface.register("eager", traceable_eager_mask)
        if packed:  # one sequence per batch row: no packed-sequence mask (what it returns outside a trace)
            masking_utils.find_packed_sequence_indices = lambda position_ids: None
        yield
    finally:
        for k, f in saved.items():
            interface.register(k, f)
        masking_utils.find_packed_sequence_indices = saved_packed


class Logits(torch.nn.Module):
    """What is converted: token ids and padding mask in, logits out, no cache."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


def convert_model(model: torch.nn.Module, *, experts: str = EXPERTS, tokens: int = 8, **fixes: bool) -> ov.Model:
    """`model` (a transformers `*ForCausalLM`) as an OpenVINO logits model with every expert in the graph.

    `experts` is the experts implementation traced (anything but "batched_mm" is for demonstrating broken
    exports); `tokens` the example input's length (the IR does not depend on it with "batched_mm");
    `fixes` may switch off `mask` or `packed` (to see why they are needed)."""
    if hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation(experts)
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(1))
    example = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    dynamic = [("input_ids", [-1, -1], ov.Type.i64), ("attention_mask", [-1, -1], ov.Type.i64)]
    with torch.no_grad(), conversion_fixes(**fixes):
        converted = ov.convert_model(Logits(model.eval()), example_input=example, input=dynamic)
    converted.outputs[0].get_tensor().set_names({"logits"})
    return converted
