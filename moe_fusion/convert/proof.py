"""Proof of the conversion: the stateful OpenVINO model against the torch model it was traced from, before
anything is fused or written.

Cases (each run from fresh states):
- prefill of 1 token, then 3 greedy decode steps through the states;
- prefill of 16 tokens, then 3 greedy decode steps;
- a left-padded batch of 2 (8 tokens and 5 tokens behind 3 pads), then 3 greedy decode steps.

Decode steps feed both sides torch's greedy token, so they stay on one path. Logits are compared where they
are defined (not at padded positions). Both sides compute in f32 (INFERENCE_PRECISION_HINT=f32, dynamic
activation quantisation off).

Tolerance: |OpenVINO - torch| <= 1e-4 of the step's logit scale (max |torch logit|, at least 1). Two f32
computations of the same graph differ only by summation order and kernel choice, measured <= 2e-6 of the scale
on the tiny fixtures; a wrong mask, position, cache step or expert moves logits by >= 1e-2 of the scale. NaN or
Inf on the OpenVINO side where torch is finite fails.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import openvino as ov
import torch

from moe_fusion.convert.trace import cache_argument, returned_cache
from moe_fusion.runtime import F32

RELATIVE_TOLERANCE = 1e-4  # compiled with runtime.F32: f32 activations and KV cache (the proof compares the
# conversion, not the runtime's u8 cache format: ~1e-3 logit error at one token)
STEPS = 3


@dataclass
class ConversionProof:
    ok: bool = True
    reason: str = ""
    worst: float = 0.0  # largest |difference| / scale over every compared step
    cases: list[str] = field(default_factory=list)

    def fail(self, reason: str) -> None:
        if self.ok:
            self.ok, self.reason = False, reason


def _positions(mask: np.ndarray) -> np.ndarray:
    """As transformers' generate: cumulative sum of the mask - 1, padded positions set to 1."""
    positions = np.cumsum(mask, axis=-1) - 1
    return np.where(mask == 0, 1, positions).astype(np.int64)


def _compare(proof: ConversionProof, case: str, step: str, got: np.ndarray, want: np.ndarray,
             keep: np.ndarray) -> None:
    got, want = got[keep], want[keep]
    scale = max(1.0, float(np.abs(want).max()))
    if not np.isfinite(got).all():
        proof.fail(f"{case}, {step}: OpenVINO logits hold NaN/Inf where torch's are finite")
        return
    error = float(np.abs(got - want).max()) / scale
    proof.worst = max(proof.worst, error)
    if error > RELATIVE_TOLERANCE:
        proof.fail(f"{case}, {step}: logits differ by {error:.2e} of their scale {scale:.3g} (tolerance "
                   f"{RELATIVE_TOLERANCE:g})")


@dataclass
class Step:
    """One model call of a case: its inputs and torch's logits (compared where `keep`)."""

    name: str
    inputs: dict[str, np.ndarray]
    logits: np.ndarray
    keep: np.ndarray


def _torch_case(model: torch.nn.Module, ids: np.ndarray, mask: np.ndarray) -> list[Step]:
    """The calls of one case and torch's logits for each: prefill, then STEPS greedy decode steps."""
    batch = ids.shape[0]
    beam = np.arange(batch, dtype=np.int32)
    positions = _positions(mask)
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                    position_ids=torch.from_numpy(positions), use_cache=True)
    cache, want = returned_cache(out), out.logits.float().numpy()
    steps = [Step(f"prefill of {ids.shape[1]}", {"input_ids": ids, "attention_mask": mask,
                                                 "position_ids": positions, "beam_idx": beam},
                  want, mask.astype(bool))]
    for step in range(1, STEPS + 1):
        token = want[:, -1].argmax(-1)[:, None].astype(np.int64)
        mask = np.concatenate([mask, np.ones((batch, 1), np.int64)], axis=1)
        position = positions[:, -1:] + 1
        positions = np.concatenate([positions, position], axis=1)
        with torch.no_grad():
            out = model(input_ids=torch.from_numpy(token), attention_mask=torch.from_numpy(mask),
                        position_ids=torch.from_numpy(position), **cache_argument(model, cache), use_cache=True)
        cache, want = returned_cache(out), out.logits.float().numpy()
        steps.append(Step(f"decode step {step}", {"input_ids": token, "attention_mask": mask,
                                                  "position_ids": position, "beam_idx": beam},
                          want, np.ones(token.shape, bool)))
    return steps


def torch_reference(model: torch.nn.Module, seed: int = 0) -> dict[str, list[Step]]:
    """Every case's calls and torch's logits, computed before the trace so that the torch model can be freed
    before OpenVINO compiles the converted one (memory: the two are never held at once beyond the trace)."""
    rng = np.random.default_rng(seed)
    vocab = model.config.vocab_size
    cases = {}
    for tokens in (1, 16):
        ids = rng.integers(0, vocab, (1, tokens)).astype(np.int64)
        cases[f"prefill {tokens}"] = _torch_case(model, ids, np.ones_like(ids))
    ids = rng.integers(0, vocab, (2, 8)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, :3] = 0
    cases["left-padded batch of 2"] = _torch_case(model, ids, mask)
    return cases


def prove_saved(reference: dict[str, list[Step]], xml: str) -> ConversionProof:
    """`prove_conversion` of the model saved at `xml`, in a process of its own: the CPU plugin keeps what it
    compiled (an f32 copy of the experts, for this f32 proof) after the model is gone, until its process ends."""
    from moe_fusion.isolate import run_isolated

    return run_isolated(_prove_file, reference, xml)


def _prove_file(reference: dict[str, list[Step]], xml: str) -> ConversionProof:
    from moe_fusion.io import read_model

    return prove_conversion(reference, read_model(xml))


def prove_conversion(reference: dict[str, list[Step]], ov_model: ov.Model, core: ov.Core | None = None) \
        -> ConversionProof:
    """Run `ov_model` (stateful, as converted) through the reference's calls and compare with torch's logits."""
    proof = ConversionProof()
    request = (core or ov.Core()).compile_model(ov_model, "CPU", F32).create_infer_request()
    for case, steps in reference.items():
        request.reset_state()
        for step in steps:
            got = request.infer(step.inputs)["logits"]
            _compare(proof, case, step.name, got, step.logits, step.keep)
        proof.cases.append(case)
    return proof
