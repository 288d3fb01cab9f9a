"""How models run when their numbers matter: one OpenVINO Core that knows FusedExperts, the f32 configuration
every comparison uses, and a runner that compiles a model once and runs it on feeds."""

from __future__ import annotations

import functools

import numpy as np
import openvino as ov

from moe_fusion.graph import output_name
from moe_fusion.op import register


@functools.cache
def core() -> ov.Core:
    """A process-wide `ov.Core` that knows FusedExperts. For your own core: `moe_fusion.register(core)`."""
    return register(ov.Core())


# How a model runs when its numbers are compared: f32 activations, and on CPU no dynamic int8 quantisation
# of activations, which the plugin otherwise applies to MatMuls on int8/int4 weights (measured on an int4
# Mixtral block: 8e-3 of the output's scale between original and fused with it, 2e-7 without), and an f32
# KV cache: the plugin otherwise stores a stateful model's cache as u8 or f16 whatever the inference
# precision, and a difference of summation order (1e-8) upstream of a layer's K/V can round one cached
# value to the next step of that format (fuzz mutant 777013/67, deploy-glm4moe: one u8 V entry of layer 1
# moved 1.9e-3, the logits at the first decode step 1.5e-4 of their scale; 3e-7 with the cache f32).
F32 = {"INFERENCE_PRECISION_HINT": "f32", "DYNAMIC_QUANTIZATION_GROUP_SIZE": "0", "KV_CACHE_PRECISION": "f32"}


def run_config(device: str, precision: str = "f32") -> dict[str, str]:
    """The configuration a comparison compiles with: `precision` for the activations and, on CPU, the KV cache
    in that precision too (a u8 cache would add its own rounding to what `check --precision` asks about)."""
    if device != "CPU":
        return {"INFERENCE_PRECISION_HINT": precision}
    if precision == "f32":
        return dict(F32)
    return {"INFERENCE_PRECISION_HINT": precision, "KV_CACHE_PRECISION": precision}



class Runner:
    """A model compiled on `device` with `config`, and one infer request to run it."""

    def __init__(self, model: ov.Model, device: str, config: dict) -> None:
        self.model = model
        self.compiled = core().compile_model(model, device, config)
        self.request = self.compiled.create_infer_request()
        self.names = [output_name(o) for o in model.outputs]

    def run(self, feeds: dict[str, np.ndarray] | list[np.ndarray]) -> list[np.ndarray]:
        result = self.request.infer(feeds if isinstance(feeds, dict) else dict(enumerate(feeds)))
        return [np.array(result[o]) for o in self.compiled.outputs]
