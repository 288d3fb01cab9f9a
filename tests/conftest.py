import ctypes

import numpy as np
import pytest

import moe_fusion
from moe_fusion.runtime import F32  # accuracy is compared in f32, without dynamic activation quantisation


def compile_f32(model):
    return moe_fusion.core().compile_model(model, "CPU", F32)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


class _SignalStack(ctypes.Structure):
    _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]


def _signal_stack() -> _SignalStack:
    current = _SignalStack()
    ctypes.CDLL(None).sigaltstack(None, ctypes.byref(current))
    return current


@pytest.fixture(autouse=True)
def _main_thread_signal_stack_kept():
    """openvino_genai 2026.4 moves the main thread's alternate signal stack when an LLMPipeline is created and
    leaves it on memory it freed once a second one is gone (seen: sigaltstack before/after each pipeline). The
    next signal handled on that stack segfaults: test_hostile's Ctrl-C after test_convert_fixtures' pipelines
    did. Each test gets back the stack it started with. (Not moe-fusion's: it creates no pipelines.)"""
    before = _signal_stack()
    yield
    after = _signal_stack()
    if (after.ss_sp, after.ss_flags, after.ss_size) != (before.ss_sp, before.ss_flags, before.ss_size):
        ctypes.CDLL(None).sigaltstack(ctypes.byref(before), None)
