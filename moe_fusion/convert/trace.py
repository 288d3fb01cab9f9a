"""Trace a transformers `*ForCausalLM` into an OpenVINO model with the KV cache as explicit inputs/outputs.

    forward(input_ids, attention_mask, position_ids, past_key_values.{i}.key/value...)
        -> logits, present.{i}.key/value...

the names optimum-intel gives them, so the stateful step (stateful.py) turns the pairs into states.

Why it is built this way:
- experts: `set_experts_implementation("batched_mm")`. The default `grouped_mm` does not convert
  (`aten::histc`), `eager` loops over the experts the example input hit and freezes them into the trace.
- cache: transformers' `DynamicLayer` starts from an empty tensor and concatenates the first keys onto it;
  the empty start does not convert. Here every layer is created already holding the past tensors (the traced
  inputs), so each step traces as `concat(past, new)` along the sequence axis.
- The layer count and each layer's key/value shapes come from one eager run with transformers' own cache,
  so MLA (keys and values of different widths), GQA and per-layer head counts need no per-model code.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from dataclasses import dataclass

import openvino as ov
import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from moe_fusion.compressed import mark_decompression
from moe_fusion.convert import architectures
from moe_fusion.convert.fixes import conversion_fixes, fixes_needed, padded_rows_attend

EXPERTS = "batched_mm"


@dataclass(frozen=True)
class CacheLayout:
    """Per layer: (heads, key width) and (heads, value width) of the `[batch, heads, seq, width]` tensors."""

    keys: list[tuple[int, int]]
    values: list[tuple[int, int]]

    @property
    def layers(self) -> int:
        return len(self.keys)

    def input_names(self) -> list[str]:
        return [f"past_key_values.{i}.{kind}" for i in range(self.layers) for kind in ("key", "value")]

    def output_names(self) -> list[str]:
        return [f"present.{i}.{kind}" for i in range(self.layers) for kind in ("key", "value")]


def filled_cache(past: list[torch.Tensor]) -> DynamicCache:
    """A cache whose layers already hold `past` (key, value, key, value, ...): no empty-tensor start."""
    layers = []
    for key, value in zip(past[0::2], past[1::2], strict=True):
        layer = DynamicLayer()
        layer.dtype, layer.device = key.dtype, key.device
        layer.keys, layer.values, layer.is_initialized = key, value, True
        layers.append(layer)
    cache = DynamicCache()  # no config: no layers of its own (5.5 and 5.23 alike)
    cache.layers = layers
    return cache


def cache_argument(model: torch.nn.Module, cache) -> dict:
    """The cache as `model`'s forward takes it: `cache=` from transformers 5.24 (where `past_key_values=` is
    deprecated, to be removed in 5.40), `past_key_values=` before."""
    return {"cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values": cache}


def returned_cache(out):
    """The cache a forward returned: `out.cache` from transformers 5.24, `out.past_key_values` before."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def cache_layout(model: torch.nn.Module) -> CacheLayout:
    """The cache transformers builds for this model, read from a 2-token eager run."""
    ids = torch.zeros((1, 2), dtype=torch.long)
    with torch.no_grad():
        cache = returned_cache(model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True))
    keys, values = [], []
    for i, layer in enumerate(cache.layers):
        key, value = getattr(layer, "keys", None), getattr(layer, "values", None)
        if not isinstance(key, torch.Tensor) or not isinstance(value, torch.Tensor) or key.dim() != 4:
            raise NotImplementedError(f"cache layer {i} ({type(layer).__name__}) holds no [batch, heads, seq, dim] "
                                      "keys and values (recurrent or shared state)")
        keys.append((key.shape[1], key.shape[3]))
        values.append((value.shape[1], value.shape[3]))
    return CacheLayout(keys, values)


class WithCache(torch.nn.Module):
    """What is traced: the model with its cache flattened into tensors."""

    def __init__(self, model: torch.nn.Module, layers: int) -> None:
        super().__init__()
        self.model, self.layers = model, layers

    def forward(self, input_ids, attention_mask, position_ids, *past):
        cache = filled_cache(list(past))
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         **cache_argument(self.model, cache), use_cache=True)
        present = []
        for layer in returned_cache(out).layers:
            present += [layer.keys, layer.values]
        return (out.logits, *present)


def example(layout: CacheLayout, vocab: int, batch: int = 2, new: int = 3, past: int = 4) -> dict[str, torch.Tensor]:
    """Example inputs for the trace: a batch of 2 with 4 cached and 3 new tokens (all sizes distinct)."""
    g = torch.Generator().manual_seed(1)
    inputs = {
        "input_ids": torch.randint(0, vocab, (batch, new), generator=g),
        "attention_mask": torch.ones((batch, past + new), dtype=torch.long),
        "position_ids": torch.arange(past, past + new).expand(batch, new).contiguous(),
    }
    for i in range(layout.layers):
        (kh, kd), (vh, vd) = layout.keys[i], layout.values[i]
        inputs[f"past_key_values.{i}.key"] = torch.randn((batch, kh, past, kd), generator=g)
        inputs[f"past_key_values.{i}.value"] = torch.randn((batch, vh, past, vd), generator=g)
    return inputs


def trace(model: torch.nn.Module) -> tuple[ov.Model, CacheLayout]:
    """`model` (f32, eval) as an OpenVINO model with explicit past/present tensors, dynamic batch, sequence and
    past length."""
    if hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation(EXPERTS)
    model.eval()
    layout = cache_layout(model)
    inputs = example(layout, model.config.vocab_size)
    shapes = [("input_ids", [-1, -1], ov.Type.i64), ("attention_mask", [-1, -1], ov.Type.i64),
              ("position_ids", [-1, -1], ov.Type.i64)]
    for i in range(layout.layers):
        (kh, kd), (vh, vd) = layout.keys[i], layout.values[i]
        shapes += [(f"past_key_values.{i}.key", [-1, kh, -1, kd], ov.Type.f32),
                   (f"past_key_values.{i}.value", [-1, vh, -1, vd], ov.Type.f32)]
    with contextlib.ExitStack() as stack, torch.no_grad(), warnings.catch_warnings():
        # TracerWarnings name Python branches the trace freezes; the proof (proof.py) checks the result instead
        warnings.simplefilter("ignore")
        stack.enter_context(conversion_fixes() if fixes_needed() else padded_rows_attend())
        for patch in architectures.prepare(model, model.config):
            stack.enter_context(patch)
        converted = ov.convert_model(WithCache(model, layout.layers), example_input=tuple(inputs.values()),
                                     input=[(shape, kind) for _, shape, kind in shapes])
    for parameter, (name, _, _) in zip(converted.inputs, shapes, strict=True):
        parameter.get_tensor().set_names({name})
    names = ["logits", *layout.output_names()]
    if len(converted.outputs) != len(names):
        raise RuntimeError(f"the trace has {len(converted.outputs)} outputs, expected {len(names)}")
    for output, name in zip(converted.outputs, names, strict=True):
        output.get_tensor().set_names({name})
    _mark_16bit_weights(converted)
    return converted, layout


def _mark_16bit_weights(model: ov.Model) -> None:
    """16-bit weights (storage.py) reach the f32 graph through Convert: marked as their decompression, so
    OpenVINO keeps them 16-bit instead of folding an f32 copy at compile time."""
    for op in model.get_ops():
        if op.get_type_name() == "Convert" and op.input_value(0).get_node().get_type_name() == "Constant" \
                and op.get_input_element_type(0) in (ov.Type.bf16, ov.Type.f16):
            mark_decompression(op)
