import numpy as np
import pytest

import moe_fusion
from moe_fusion.runtime import F32  # accuracy is compared in f32, without dynamic activation quantisation


def compile_f32(model):
    return moe_fusion.core().compile_model(model, "CPU", F32)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
