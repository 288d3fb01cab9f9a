import numpy as np
import pytest

import moe_fusion

# Accuracy is compared in f32: the CPU plugin may otherwise pick bf16 (AMX) or f16 for inference.
F32 = {"INFERENCE_PRECISION_HINT": "f32"}


def compile_f32(model):
    return moe_fusion.core().compile_model(model, "CPU", F32)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
