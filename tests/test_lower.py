"""Lowering FusedExperts to native OpenVINO ops (moe_fusion/lower.py): every fixture, every target, the CPU
plugin's GatherMatmul in the runtime graph, compressed weights kept compressed, plain OpenVINO with
moe_fusion not importable, and the CLI.

Tolerance: the lowered model runs the same weights as the original in f32 (INFERENCE_PRECISION_HINT=f32) and
only reorders float sums, as fusion does (measured <= 4e-7 of the logits' scale on every fixture, exactly 0
where the original was tiled already), so `check`'s defaults by weight type apply (f32: atol 1e-6 + rtol 1e-4
of the output's scale); a wrong expert, lane, clamp or routing weight moves outputs by > 1e-2 of their scale.
"""

import functools
import json
import subprocess
import sys
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import openvino as ov
import openvino.opset14 as ops
import pytest
from click.testing import CliRunner
from test_direct import BROKEN  # broken-export fixtures

import moe_fusion
from models.bench_models import SHAPES, fused_layer, layer_weights
from models.synthetic import Router, fused_model, random_experts
from moe_fusion import GEMM2_BIAS_SWIGLU_CLAMP, GEMM3_SWIGLU
from moe_fusion.checking import check
from moe_fusion.cli import main
from moe_fusion.fusing import fuse
from moe_fusion.io import load, save
from moe_fusion.lower import (
    AUTO,
    CPU,
    DEFAULT_TARGET,
    GROUPED,
    HYBRID,
    HYBRID_HINT,
    PER_EXPERT,
    PER_EXPERT_MAX_NODE_SHARE,
    RT_INFO,
    TARGETS,
    TILED,
    Block,
    CpuFacts,
    LowerReport,
    choose_form,
    decide,
    fused_experts_nodes,
    lower,
    weight_bytes,
)

FIXTURES = Path(__file__).resolve().parent.parent / "models" / "fixtures"
DIRECT_LOWERED = ("direct-deepseekv3", "direct-gptoss")
# Broken exports fuse nothing; of the direct conversions (the same FusedExperts once fused) one GEMM3, one GEMM2.
FIXTURE_NAMES = sorted(
    p.name for p in FIXTURES.iterdir()
    if p.is_dir() and p.name not in BROKEN and (not p.name.startswith("direct-") or p.name in DIRECT_LOWERED)
)
F32 = {"INFERENCE_PRECISION_HINT": "f32"}
COMPRESSED = (ov.Type.u8, ov.Type.i8, ov.Type.u4, ov.Type.i4)


def fused_fixture(name: str) -> tuple[ov.Model, ov.Model]:
    """(original, fused) of a fixture; the per-block proof is test_fixtures' job, not repeated here."""
    if not (FIXTURES / name).is_dir():  # the compressed fixtures arrive with their own commit
        pytest.skip(f"fixture {name} is not in models/fixtures")
    return _fused_fixture(name)


@functools.cache
def _fused_fixture(name: str) -> tuple[ov.Model, ov.Model]:
    original = load(FIXTURES / name)
    fused = original.clone()
    report = fuse(fused, verify=False)
    assert report.fused, report.table()
    return original, fused


def lowered(name: str, target: str = CPU) -> ov.Model:  # cpu: the stacked forms the tests below inspect
    model = fused_fixture(name)[1].clone()
    lower(model, target)
    return model


def gather_matmuls(model: ov.Model) -> list:
    """The GatherMatmul nodes of the model the CPU plugin compiled (its runtime graph)."""
    compiled = ov.Core().compile_model(model, "CPU", F32)
    runtime = compiled.get_runtime_model().get_ordered_ops()
    return [n for n in runtime if n.get_rt_info()["layerType"].astype(str) == "GatherMatmul"]


@pytest.mark.parametrize("fixture", FIXTURE_NAMES)
def test_every_fixture_lowers_for_every_target_and_stays_equivalent(fixture):
    original, fused = fused_fixture(fixture)
    blocks = len(fused_experts_nodes(fused))
    for target in TARGETS:
        model = fused.clone()
        report = lower(model, target, cpu=NO_AMX)  # hybrid (and auto) store weights f32 for it: exact at f32
        assert len(report.lowered) == blocks
        assert not fused_experts_nodes(model)
        result = check(original, model, tokens=(1, 16), steps=2)
        assert result.equivalent, f"{target}: {result.reason}"


# fixture -> (GatherMatmuls per MoE layer, form the cpu target picks)
GATHER_MATMUL = {
    "gen1-qwen3moe": (3, TILED),  # GEMM3 from a per-expert loop
    "gen1-mixtral-int4-g16-sym": (3, TILED),  # compressed GEMM3 -> GatherMatmulCompressed
    "gen1-gptoss": (2, TILED),  # GEMM2 with biases and clamp
    "gen2-gptoss-zerobias": (2, GROUPED),  # zero biases: the plugin's 2-GEMM pattern cannot match; grouped
}


@pytest.mark.parametrize("fixture", sorted(GATHER_MATMUL))
def test_cpu_target_runs_as_gather_matmul(fixture):
    per_layer, form = GATHER_MATMUL[fixture]
    model = fused_fixture(fixture)[1].clone()
    report = lower(model, CPU)
    assert set(report.lowered.values()) == {form}
    layers = len(report.lowered)
    found = gather_matmuls(model)
    assert len(found) == per_layer * layers
    if "int" in fixture:  # GatherMatmulCompressed: the weights reach the kernel still compressed
        assert all(n.input_value(1).get_element_type() in COMPRESSED for n in found)


def expert_matmuls(model: ov.Model) -> list:
    """MatMuls on stacked `[E, out, in]` weights (transpose_b), the lowered experts' GEMMs."""
    return [
        n for n in model.get_ordered_ops()
        if n.get_type_name() in ("MatMul", "GroupedMatMul")
        and n.get_input_partial_shape(1).rank.get_length() == 3
        and n.input_value(1).get_node().get_type_name() != "Parameter"  # not the rotary embedding's MatMul
        and n.get_input_partial_shape(1).is_static
    ]


def test_compressed_weights_are_read_without_their_transpose():
    model = lowered("gen1-mixtral-int8-asym")
    matmuls = expert_matmuls(model)
    assert len(matmuls) == 6
    for matmul in matmuls:
        assert matmul.get_attributes()["transpose_b"]
        chain, value = [], matmul.input_value(1)
        while value.get_node().get_type_name() != "Constant":  # down the data input of the decompression
            chain.append(value.get_node().get_type_name())
            value = value.get_node().input_value(0)
        assert "Transpose" not in chain and "Multiply" in chain
        assert value.get_node().get_element_type() in COMPRESSED


def test_f16_weights_stay_f16_and_out_major():
    model = lowered("gen1-mixtral-fp16")
    stacked = expert_matmuls(model)
    assert len(stacked) == 6
    for matmul in stacked:
        assert matmul.get_attributes()["transpose_b"]
        convert = matmul.input_value(1).get_node()
        assert convert.get_type_name() == "Convert"
        assert convert.input_value(0).get_node().get_element_type() == ov.Type.f16


def test_synthetic_int4_block_runs_as_gather_matmul_compressed():
    weights = layer_weights(SHAPES["small"], "int4")
    fused = fused_layer(weights)
    model = fused.clone()
    lower(model, CPU)
    found = gather_matmuls(model)
    assert len(found) == 3 and all(n.input_value(1).get_element_type() == ov.Type.u4 for n in found)
    x = np.random.default_rng(0).standard_normal((1, 9, SHAPES["small"].hidden)).astype(np.float32)
    want = moe_fusion.core().compile_model(fused, "CPU", F32)(x)[0]
    got = ov.Core().compile_model(model, "CPU", F32)(x)[0]
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


# Synthetic blocks with the attributes no fixture has: no clamp, gate on the odd lane, swish beta != 1,
# repeated experts in a row, i32 indices. Routing comes in as inputs, so any (weights, indices) can be fed.
CASES = {
    "gemm3": (GEMM3_SWIGLU, {}),
    "gemm3-beta": (GEMM3_SWIGLU, {"expert_beta": 1.3}),
    "gemm2-noclamp-odd": (GEMM2_BIAS_SWIGLU_CLAMP, {"expert_alpha": 0.0, "gate_idx": 1, "expert_beta": 1.3}),
    "gemm2-clamp": (GEMM2_BIAS_SWIGLU_CLAMP, {"expert_alpha": 0.5}),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("target", TARGETS)
def test_synthetic_attributes_and_repeated_experts(case, target, rng):
    expert_type, attrs = CASES[case]
    experts = random_experts(6, 16, 12, expert_type, **attrs)
    fused = fused_model(experts, top_k=3, index_type="i32")
    model = fused.clone()
    lower(model, target)
    x = rng.standard_normal((11, 16)).astype(np.float32)
    idx = rng.integers(0, 6, (11, 3)).astype(np.int32)
    idx[0] = [2, 2, 5]  # a repeated expert adds up
    rw = rng.random((11, 3)).astype(np.float32)
    want = moe_fusion.core().compile_model(fused, "CPU", F32)([x, rw, idx])[0]
    got = ov.Core().compile_model(model, "CPU", F32)([x, rw, idx])[0]
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


@pytest.mark.parametrize("expert_type", [GEMM3_SWIGLU, GEMM2_BIAS_SWIGLU_CLAMP])
def test_per_expert_with_experts_that_get_no_tokens(expert_type, rng):
    """Experts with zero routed rows run an empty Slice ([0, H]) through their GEMMs; all tokens on one
    expert, a single token (decode) and a row routed twice to the same expert work too."""
    experts = random_experts(6, 16, 12, expert_type, expert_alpha=0.5)
    fused = fused_model(experts, top_k=2)
    model = fused.clone()
    assert set(lower(model, PER_EXPERT).lowered.values()) == {PER_EXPERT}
    assert not fused_experts_nodes(model)
    want_model = moe_fusion.core().compile_model(fused, "CPU", F32)
    got_model = ov.Core().compile_model(model, "CPU", F32)
    x = rng.standard_normal((7, 16)).astype(np.float32)
    rw = rng.random((7, 2)).astype(np.float32)
    cases = {
        "experts 1 and 4 only": rng.choice([1, 4], (7, 2)),
        "all on the last expert": np.full((7, 2), 5),
        "first expert only, repeated": np.zeros((7, 2)),
    }
    for what, idx in cases.items():
        feeds = [x, rw, idx.astype(np.int64)]
        want, got = want_model(feeds)[0], got_model(feeds)[0]
        assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max(), what
    one = [x[:1], rw[:1], np.array([[3, 0]], np.int64)]  # decode: 4 of 6 experts empty
    want, got = want_model(one)[0], got_model(one)[0]
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


def runtime_fully_connected(model: ov.Model) -> list:
    compiled = ov.Core().compile_model(model, "CPU", F32)
    runtime = compiled.get_runtime_model().get_ordered_ops()
    return [n for n in runtime if n.get_rt_info()["layerType"].astype(str) == "FullyConnected"]


# fixture -> weight types the per-expert FullyConnected nodes must read (every FC of these fixtures)
PER_EXPERT_WEIGHTS = {
    "gen1-mixtral-int4-g16-sym": {ov.Type.i4, ov.Type.u8},  # NNCF kept some layers int8
    "gen1-qwen3moe-norm-int8-asym": {ov.Type.u8},
    "gen1-mixtral-fp16": {ov.Type.f16},  # marked decompression: not folded into an f32 copy
}


@pytest.mark.parametrize("fixture", sorted(PER_EXPERT_WEIGHTS))
def test_per_expert_weights_stay_compressed_in_the_runtime_graph(fixture):
    fused = fused_fixture(fixture)[1]
    model = fused.clone()
    report = lower(model, PER_EXPERT)
    experts = fused_experts_nodes(fused)[0].get_input_partial_shape(3)[0].get_length()
    # one out-major [out, in] weight per expert and GEMM, read from its own slice of the stacked constant
    expert_gemms = [n for n in model.get_ordered_ops() if n.get_type_name() == "MatMul"
                    and "/expert" in n.get_friendly_name()]
    assert len(expert_gemms) == 3 * experts * len(report.lowered)
    for matmul in expert_gemms:
        assert matmul.get_attributes()["transpose_b"]
        chain, value = [], matmul.input_value(1)
        while value.get_node().get_type_name() != "Constant":
            chain.append(value.get_node().get_type_name())
            value = value.get_node().input_value(0)
        assert "Transpose" not in chain and "Gather" not in chain, chain
        assert value.get_node().get_element_type() in PER_EXPERT_WEIGHTS[fixture]
    found = runtime_fully_connected(model)
    assert len(found) >= len(expert_gemms)
    assert {n.input_value(1).get_element_type() for n in found} <= PER_EXPERT_WEIGHTS[fixture]


def test_cpu_target_falls_back_to_grouped_where_gather_matmul_would_not_form(rng):
    experts = random_experts(6, 16, 12, GEMM3_SWIGLU, expert_beta=1.3)
    model = fused_model(experts, Router(rng.standard_normal((16, 6)).astype(np.float32), 2))
    report = lower(model, CPU)
    assert list(report.lowered.values()) == [GROUPED]
    assert len(gather_matmuls(model)) == 3


@pytest.mark.parametrize("target", [CPU, PER_EXPERT])
def test_bf16_constant_weights_are_transposed_bit_exactly(target, rng):
    experts = random_experts(4, 16, 8, GEMM3_SWIGLU)
    hidden = ops.parameter([-1, 16], np.float32)
    router = Router(rng.standard_normal((16, 4)).astype(np.float32), 2)
    routing, indices = router.build(hidden.output(0))

    def bf16(array):  # f32 -> bf16 by truncation; exactly representable values round-trip
        bits = (np.ascontiguousarray(array, np.float32).view(np.uint32) >> 16).astype(np.uint16)
        tensor = ov.Tensor(ov.Type.bf16, ov.Shape(list(array.shape)))
        tensor.data.view(np.uint16)[...] = bits
        return ops.convert(ov.op.Constant(tensor), ov.Type.f32)

    node = moe_fusion.FusedExperts(hidden, routing, indices, *[bf16(w) for w in experts.weights])
    fused = ov.Model([node.output(0)], [hidden])
    model = fused.clone()
    lower(model, target)
    x = rng.standard_normal((5, 16)).astype(np.float32)
    want = moe_fusion.core().compile_model(fused, "CPU", F32)(x)[0]
    got = ov.Core().compile_model(model, "CPU", F32)(x)[0]
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


# Runs in a fresh interpreter: -I (no PYTHONPATH, user site or cwd) and moe_fusion blocked in sys.modules,
# so the editable install's path hook cannot bring it back either.
PLAIN_OPENVINO = """
import sys
sys.modules["moe_fusion"] = None
import numpy as np, openvino as ov
try:
    import moe_fusion
except ImportError:
    pass
else:
    raise SystemExit("moe_fusion is importable")
xml, out = sys.argv[1], sys.argv[2]
model = ov.Core().read_model(xml)
assert not [n for n in model.get_ordered_ops() if n.get_type_name() == "FusedExperts"]
compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
feeds = dict(np.load(out + ".in.npz"))
result = compiled.create_infer_request().infer(feeds)
np.save(out, result[compiled.output("logits")])
assert not [m for m, v in sys.modules.items() if m.startswith("moe_fusion") and v is not None]
"""


def _llm_feeds(model: ov.Model, tokens: int = 6) -> dict:
    ids = np.random.default_rng(0).integers(0, 200, (1, tokens))
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(tokens)[None],
             "beam_idx": np.zeros(1, np.int32)}
    names = {p.get_output_tensor(0).get_any_name() for p in model.get_parameters()}
    return {k: v for k, v in feeds.items() if k in names}


@pytest.mark.parametrize(("fixture", "target"), [("gen1-qwen3moe", CPU), ("gen1-gptoss", CPU),
                                                 ("gen2-gptoss-zerobias", CPU), ("gen1-gptoss", PER_EXPERT),
                                                 ("gen1-mixtral-int4-g16-sym", PER_EXPERT)])
def test_lowered_ir_runs_with_plain_openvino(fixture, target, tmp_path):
    original = fused_fixture(fixture)[0]
    model = lowered(fixture, target)
    folder = save(model, FIXTURES / fixture, tmp_path / "lowered")
    feeds = _llm_feeds(original)
    np.savez(tmp_path / "logits.in.npz", **feeds)
    run = subprocess.run(
        [sys.executable, "-I", "-c", PLAIN_OPENVINO, str(folder / "openvino_model.xml"), str(tmp_path / "logits")],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    got = np.load(tmp_path / "logits.npy")
    compiled = ov.Core().compile_model(original, "CPU", F32)
    want = compiled.create_infer_request().infer(feeds)[compiled.output("logits")]
    assert np.abs(got - want).max() <= 1e-6 + 1e-4 * np.abs(want).max()


def test_cli_lower_and_fuse_lower(tmp_path):
    runner = CliRunner()
    fused = tmp_path / "fused"
    assert runner.invoke(main, ["fuse", str(FIXTURES / "gen1-mixtral"), "-o", str(fused), "--no-verify"]).exit_code == 0
    result = runner.invoke(main, ["lower", str(fused), "-o", str(tmp_path / "low"), "--target", "grouped"])
    assert result.exit_code == 0, result.output
    assert "2 FusedExperts lowered for grouped (2 grouped)" in result.output
    assert (tmp_path / "low" / "config.json").is_file()
    per = runner.invoke(main, ["lower", str(fused), "-o", str(tmp_path / "per"), "--target", "per-expert"])
    assert per.exit_code == 0, per.output
    assert "2 FusedExperts lowered for per-expert (2 per-expert)" in per.output
    assert json.loads((tmp_path / "low" / "config.json").read_text())["model_type"] == "mixtral"
    both = ["fuse", str(FIXTURES / "gen1-mixtral"), "-o", str(tmp_path / "both"), "--lower", "cpu", "--no-verify"]
    result = runner.invoke(main, both)
    assert result.exit_code == 0, result.output
    plain = ov.Core().read_model(tmp_path / "both" / "openvino_model.xml")  # no extension needed
    assert "FusedExperts" not in Counter(n.get_type_name() for n in plain.get_ordered_ops())
    default = ["fuse", str(FIXTURES / "gen1-mixtral"), "-o", str(tmp_path / "auto"), "--lower", "--no-verify"]
    result = runner.invoke(main, default)  # --lower alone: the default target, chosen for this CPU
    assert result.exit_code == 0, result.output
    assert "2 FusedExperts lowered for auto (2 " in result.output and CpuFacts.detect().describe() in result.output
    again = runner.invoke(main, ["lower", str(fused), "-o", str(tmp_path / "low")])
    assert again.exit_code == 2 and "--force" in again.output
    hybrid = ["lower", str(fused), "-o", str(tmp_path / "hyb"), "--target", "hybrid", "--precision", "f32"]
    result = runner.invoke(main, hybrid)  # lowered for f32 inference: exact weights, check at f32 holds
    assert result.exit_code == 0 and "decode weights stored f32" in result.output, result.output
    saved = ov.Core().read_model(tmp_path / "hyb" / "openvino_model.xml")
    assert saved.get_rt_info([RT_INFO, "lowering", "decode_weights"]).astype(str) == "f32"
    bad = runner.invoke(main, ["lower", str(fused), "-o", str(tmp_path / "x"), "--target", "gpu"])
    assert bad.exit_code == 2


# ---- the default target: `auto` chooses per CPU (facts injected so both choices are pinned on any machine) ----

NO_AMX = CpuFacts(amx=False, precision="f32", name="CPU without AMX")
NO_AMX_BF16 = CpuFacts(amx=False, precision="bf16", name="CPU without AMX, bf16 inference (avx512_bf16)")
AMX = CpuFacts(amx=True, precision="bf16", name="CPU with AMX")
AMX_F32 = CpuFacts(amx=True, precision="f32", name="CPU with AMX, f32 inference asked")  # no AMX GEMM path
HYBRID_TILED, HYBRID_GROUPED = f"{HYBRID}({PER_EXPERT}/{TILED})", f"{HYBRID}({PER_EXPERT}/{GROUPED})"

# (cpu, fixture) -> the forms auto must pick
POLICY = {
    ("no-amx", "gen1-qwen3moe"): (NO_AMX, {HYBRID_TILED}),
    ("no-amx", "gen2-gptoss-zerobias"): (NO_AMX, {HYBRID_GROUPED}),  # tiled pattern cannot form: grouped body
    ("no-amx", "gen1-gptoss"): (NO_AMX, {HYBRID_TILED}),
    ("no-amx", "gen1-mixtral-int4-g16-sym"): (NO_AMX, {PER_EXPERT}),  # int4: hybrid would hold 2 packed copies
    ("amx-f32", "gen1-mixtral-int4-g16-sym"): (AMX_F32, {PER_EXPERT}),
    ("amx-f32", "gen1-qwen3moe"): (AMX_F32, {HYBRID_TILED}),
    ("amx", "gen1-qwen3moe"): (AMX, {TILED}),
    ("amx", "gen1-gptoss"): (AMX, {TILED}),
    ("amx", "gen2-gptoss-zerobias"): (AMX, {GROUPED}),
    ("amx", "gen1-mixtral-int4-g16-sym"): (AMX, {TILED}),
}


def real_shape_block(name: str) -> ov.Node:
    """A FusedExperts at a real layer's shape on f16 zeros (never touched, so never allocated): the policy
    reads only shapes and byte sizes."""
    shape = SHAPES[name]
    e, h, i = shape.experts, shape.hidden, shape.intermediate
    x = ops.parameter([-1, h], np.float32)
    routing, indices = ops.parameter([-1, shape.top_k], np.float32), ops.parameter([-1, shape.top_k], np.int64)
    weights = [ops.convert(ops.constant(np.zeros(dims, np.float16), shared_memory=True), ov.Type.f32)
               for dims in ((e, h, i), (e, h, i), (e, i, h))]
    return moe_fusion.FusedExperts(x, routing, indices, *weights)


# layer -> what auto takes without AMX at the real shape (docs/lowering.md, this machine's tables)
REAL_SHAPES = {
    "qwen3": HYBRID,  # 384 GEMM nodes vs 75 MB a token reads: per-expert decodes 2.2-2.6x native, hybrid 1.00x
    "mixtral": PER_EXPERT,  # 24 nodes vs 705 MB: per-expert decodes 0.85x native's time, hybrid 1.25x
}


@pytest.mark.parametrize("layer", sorted(REAL_SHAPES))
def test_auto_decides_by_cpu_and_shape_at_real_shapes(layer):
    """Without AMX (or with f32 inference asked) auto weighs per-expert's GEMM nodes against the bytes a token
    reads: few large experts per-expert, many small ones hybrid; with AMX and bf16 GatherMatmul."""
    node = real_shape_block(layer)
    for cpu in (NO_AMX, NO_AMX_BF16, AMX_F32):
        form, reason = choose_form(node, cpu)
        assert form == REAL_SHAPES[layer], reason
        assert (f"stored {cpu.precision}" in reason) == (form == HYBRID)
    assert choose_form(node, AMX)[0] == CPU
    assert weight_bytes(node) == 3 * 2 * SHAPES[layer].experts * SHAPES[layer].hidden * SHAPES[layer].intermediate
    share = Block.of(node).node_share(NO_AMX)
    assert (share <= PER_EXPERT_MAX_NODE_SHARE) == (layer == "mixtral")  # 0.04 vs 5.4: the rule has margin


@pytest.mark.parametrize("layer", ["qwen3", "mixtral"])
def test_auto_keeps_one_packed_copy_for_compressed_weights(layer):
    """int8/int4 weights without AMX: hybrid's two bodies would each pack a compressed copy (measured 1.95x
    native's runtime memory at Qwen3 int4), so auto takes per-expert (1.1x) even at many small experts;
    with AMX and bf16 still cpu."""
    shape = SHAPES[layer]
    block = Block(experts=shape.experts, top_k=shape.top_k, gemms=3,
                  weight_bytes=3 * shape.experts * shape.hidden * shape.intermediate // 2, compressed=True)
    for cpu in (NO_AMX, NO_AMX_BF16, AMX_F32):
        form, reason = decide(block, cpu)
        assert form == PER_EXPERT and ("int8/int4" in reason) == (layer == "qwen3")  # mixtral: by shape
        # the trade left on the table is said where users read it, the lowering summary
        summary = LowerReport(AUTO, {"block": form}, reasons={form: reason}, cpu=cpu).summary()
        assert (HYBRID_HINT in summary) == (layer == "qwen3")
    assert decide(block, AMX)[0] == CPU
    assert decide(replace(block, compressed=False), NO_AMX_BF16)[0] == REAL_SHAPES[layer]


@pytest.mark.parametrize(("cpu", "fixture"), sorted(POLICY))
def test_auto_picks_the_form_for_the_cpu_records_it_and_stays_equivalent(cpu, fixture, tmp_path):
    facts, forms = POLICY[cpu, fixture]
    original, fused = fused_fixture(fixture)
    model = fused.clone()
    report = lower(model, AUTO, cpu=facts)
    assert set(report.lowered.values()) == forms
    assert report.cpu == facts and facts.describe() in report.summary()
    result = check(original, model, tokens=(1, 16), steps=2)
    assert result.equivalent, result.reason
    # the choice travels with the saved model
    saved = ov.Core().read_model(save(model, FIXTURES / fixture, tmp_path / "low") / "openvino_model.xml")
    info = {key: saved.get_rt_info([RT_INFO, "lowering", key]).astype(str)
            for key in ("target", "forms", "cpu", "reason")}
    assert info["target"] == AUTO and info["forms"] == ",".join(sorted(forms))
    assert info["cpu"] == facts.describe()
    assert ("AMX with bf16" in info["reason"]) == (facts is AMX)
    assert all(name.split("(")[0] in info["reason"] for name in ({"tiled": "cpu", "grouped": "cpu"}.get(f, f)
                                                                   for f in forms))


def test_auto_is_the_default_and_decides_for_this_cpu():
    assert DEFAULT_TARGET == AUTO
    flags = next(ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")).split()
    here = CpuFacts.detect()
    assert here.amx == ("amx_bf16" in flags and "amx_tile" in flags)
    assert here.precision == ov.Core().get_property("CPU", "INFERENCE_PRECISION_HINT").get_type_name()
    model = fused_fixture("gen1-mixtral")[1].clone()
    report = lower(model)
    assert report.target == AUTO and report.cpu == here
    assert set(report.lowered.values()) == {TILED if here.amx and here.precision == "bf16" else HYBRID_TILED}


def test_per_expert_hands_rows_out_with_one_split_and_runs_only_routed_experts():
    """Decode at many experts: the experts' rows come from one VariadicSplit (not a Slice and two Gathers
    per expert), and the plugin runs no GEMM of an expert that got no rows."""
    weights = layer_weights(SHAPES["small"], "f16")  # 16 experts, top-4
    model = fused_layer(weights)
    lower(model, PER_EXPERT)
    kinds = Counter(n.get_type_name() for n in model.get_ordered_ops())
    assert kinds["VariadicSplit"] == 1 and kinds["Slice"] <= 1 and kinds["Gather"] <= 2  # none per expert
    compiled = ov.Core().compile_model(model, "CPU", {**F32, "PERF_COUNT": True})
    request = compiled.create_infer_request()
    request.infer({0: np.random.default_rng(0).standard_normal((1, 1, SHAPES["small"].hidden), np.float32)})
    # the first inference after compiling: only GEMMs that got rows have a kernel (exec type), the rest "undef"
    ran = [p for p in request.get_profiling_info()
           if p.node_type == "FullyConnected" and "/expert" in p.node_name and not p.exec_type.startswith("undef")]
    assert len(ran) == 3 * SHAPES["small"].top_k  # gate, up, down of the 4 routed experts; 12 experts idle
