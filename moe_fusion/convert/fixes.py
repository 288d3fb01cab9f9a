"""transformers 5.5's mask code does not trace; these fixes make it, only where the installed version needs them.

1. Under `torch.jit.trace`, `sdpa_mask` receives `q_length` as a tensor and takes it for the deprecated
   `cache_position` (`IndexError: tuple index out of range`); it also uses vmap for custom mask functions.
   A mask function that broadcasts index tensors instead is registered for "sdpa" and "eager".
2. `find_packed_sequence_indices` traces to `aten::diff` (no conversion rule): one sequence per row here.

transformers 5.23 traces without either (checked: `fixes_needed()` is False there and the traced model matches
torch); the cut-off below is the first release seen without the problem.

`convert_model` (the logits-only conversion of earlier releases) is kept for compatibility; `convert` makes a
deployable stateful folder instead.
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
FIXED_IN = (5, 6)  # the first transformers minor whose mask code traces as it is (5.5.4 needs both fixes)


def fixes_needed() -> bool:
    """Whether the installed transformers needs the two mask fixes to trace."""
    import transformers

    major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
    return (major, minor) < FIXED_IN


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


@contextlib.contextmanager
def padded_rows_attend() -> Iterator[None]:
    """transformers' own "sdpa" mask, with query rows that may attend to nothing (left padding) attending
    everywhere: OpenVINO's SDPA gives NaN for such rows where torch >= 2.5 gives 0, and the NaN reaches real
    tokens through V in the next layer wherever the plugin computes masked positions as 0 * NaN (seen with
    DeepSeek's MLA, whose values are narrower than its keys). The rows' own outputs are padding either way.
    (transformers 5.5's `traceable_sdpa_mask` above does the same.)"""
    interface = masking_utils.ALL_MASK_ATTENTION_FUNCTIONS
    original = interface["sdpa"]

    def sdpa(*args, **kwargs):
        mask = original(*args, **kwargs)
        if mask is None or mask.dtype != torch.bool:
            return mask
        return mask | torch.all(~mask, dim=-1, keepdim=True)

    interface.register("sdpa", sdpa)
    try:
        yield
    finally:
        interface.register("sdpa", original)


class Logits(torch.nn.Module):
    """What is converted: token ids and padding mask in, logits out, no cache."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


def convert_model(model: torch.nn.Module, *, experts: str = EXPERTS, tokens: int = 8, **fixes: bool) -> ov.Model:
    """Deprecated (use `moe_fusion.convert.convert` for a deployable folder): `model` (a transformers
    `*ForCausalLM`) as an OpenVINO logits model without a KV cache, every expert in the graph.

    `experts` is the experts implementation traced (anything but "batched_mm" is for demonstrating broken
    exports); `tokens` the example input's length (the IR does not depend on it with "batched_mm");
    `fixes` may switch off `mask` or `packed` (to see why they are needed)."""
    if hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation(experts)
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(1))
    example = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    dynamic = [("input_ids", [-1, -1], ov.Type.i64), ("attention_mask", [-1, -1], ov.Type.i64)]
    if not fixes_needed():
        fixes = {"mask": False, "packed": False, **fixes}
    with torch.no_grad(), conversion_fixes(**fixes):
        converted = ov.convert_model(Logits(model.eval()), example_input=example, input=dynamic)
    converted.outputs[0].get_tensor().set_names({"logits"})
    return converted
