"""The torch model keeps its checkpoint's 16-bit weights and computes in f32.

Released MoE checkpoints are bf16 (some f16). Loading them as f32 doubles the model in memory before anything
else runs. Instead every 16-bit parameter stays as stored and reads as f32 where it is used (a
`torch.nn.utils.parametrize` upcast), so:

- eager runs (the proof's reference) compute exactly what the f32-loaded model computes (bf16 -> f32 is
  exact), holding one module's f32 copy at a time;
- the trace records `Convert(Constant bf16)`: the OpenVINO model stores the weights in 16 bits too, the
  Convert marked as their decompression (as OpenVINO's own 16-bit exports are), and computes in f32.

Buffers (rotary frequencies and the like: small) are cast to f32 outright.
"""

from __future__ import annotations

import torch
from torch.nn.utils import parametrize

SIXTEEN_BIT = (torch.bfloat16, torch.float16)
NAMES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


class _Upcast(torch.nn.Module):
    def forward(self, stored: torch.Tensor) -> torch.Tensor:
        return stored.float()


def checkpoint_dtype(config: dict) -> torch.dtype:
    """The dtype the checkpoint's weights are stored in (config.json's `dtype`/`torch_dtype`, nested sections
    flattened by the caller), f32 if it names none or another."""
    name = config.get("dtype") or config.get("torch_dtype")
    return NAMES.get(str(name).removeprefix("torch."), torch.float32)


def compute_in_f32(model: torch.nn.Module) -> torch.nn.Module:
    """Make `model`, loaded with 16-bit weights, compute in f32 while its weights stay 16-bit. In place."""
    upcast = _Upcast()
    for module in list(model.modules()):
        for name, parameter in list(module.named_parameters(recurse=False)):
            if parameter.dtype in SIXTEEN_BIT:
                parametrize.register_parametrization(module, name, upcast, unsafe=True)
        for name, buffer in list(module.named_buffers(recurse=False)):
            if buffer.dtype in SIXTEEN_BIT:
                setattr(module, name, buffer.float())
    return model
