"""`moe-fusion convert` itself: needs torch and transformers (the test extra installs them; skipped where they
are missing, and then not counted as run). Tiny random Hugging Face folders are made here (no hub);
tests/test_convert_fixtures.py covers the committed converted folders without torch.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import openvino as ov
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from moe_fusion.convert import convert  # noqa: E402
from moe_fusion.convert.pipeline import ConversionError  # noqa: E402
from moe_fusion.io import InputError  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
F32 = {"INFERENCE_PRECISION_HINT": "f32", "DYNAMIC_QUANTIZATION_GROUP_SIZE": "0"}
BASE = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=256, tie_word_embeddings=False)


def qwen3moe():
    return transformers.Qwen3MoeConfig(**BASE, head_dim=16, num_experts_per_tok=2, moe_intermediate_size=40,
                                       intermediate_size=56, num_experts=8, norm_topk_prob=True,
                                       decoder_sparse_step=1, mlp_only_layers=[])


def hf_folder(path: Path, config, dtype=torch.float32) -> Path:
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # routers drawn wider than init (models/README.md): routing that depends on the input
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.copy_(torch.randn(p.shape) * 0.5)
    model.to(dtype).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory):
    return hf_folder(tmp_path_factory.mktemp("hf") / "qwen3moe", qwen3moe())


def cli(*args) -> subprocess.CompletedProcess:
    code = "from moe_fusion.cli import main; main()"
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})


def greedy_torch(folder: Path, ids: np.ndarray, new: int) -> list[int]:
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(torch.from_numpy(ids), attention_mask=torch.ones(ids.shape, dtype=torch.long),
                             max_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


def greedy_genai(folder: Path, ids: np.ndarray, new: int) -> list[int]:
    import openvino_genai

    pipe = openvino_genai.LLMPipeline(str(folder), "CPU", **F32)
    config = pipe.get_generation_config()
    config.max_new_tokens, config.do_sample, config.ignore_eos = new, False, True
    config.eos_token_id, config.stop_token_ids = 1 << 30, {1 << 30}
    result = pipe.generate(openvino_genai.TokenizedInputs(ov.Tensor(ids), ov.Tensor(np.ones_like(ids))), config)
    return list(result.tokens[0])


def test_cli_converts_a_folder_that_genai_runs_as_transformers_does(qwen3_dir, tmp_path):
    out = tmp_path / "out"
    run = cli("convert", qwen3_dir, "-o", out)
    assert run.returncode == 0, run.stderr
    assert "2 MoE blocks fused" in run.stdout
    assert {"openvino_model.xml", "openvino_model.bin", "config.json", "generation_config.json",
            "moe_fusion_report.json"} <= {p.name for p in out.iterdir()}
    report = json.loads((out / "moe_fusion_report.json").read_text())
    assert [b["status"] for b in report["blocks"]] == ["fused", "fused"]
    assert report["conversion"]["proof_worst"] < 1e-4
    assert report["conversion"]["proof_cases"] == ["prefill 1", "prefill 16", "left-padded batch of 2"]
    ids = np.random.default_rng(3).integers(3, 120, (1, 9)).astype(np.int64)
    assert greedy_genai(out, ids, 10) == greedy_torch(qwen3_dir, ids, 10)


# transformers 5.24 renamed the forward's `past_key_values` to `cache` (the old name goes in 5.40): convert passes
# whichever the installed version takes, so no deprecation warning is raised on any version
@pytest.mark.filterwarnings("error:.*past_key_values.*:FutureWarning")
@pytest.mark.parametrize("weight_format", ["fp16", "int4", "int4-sym"])
def test_compressed_formats_keep_the_experts_compressed(qwen3_dir, tmp_path, weight_format):
    out = tmp_path / weight_format
    report = convert(qwen3_dir, out, weight_format=weight_format, lower="tiled")
    assert len(report.fuse.fused) == 2
    model = ov.Core().read_model(out / "openvino_model.xml")
    stored = {"fp16": {ov.Type.f16}, "int4": {ov.Type.u4, ov.Type.u8},
              "int4-sym": {ov.Type.i4, ov.Type.u8}}[weight_format]
    stacked = [op for op in model.get_ops() if op.get_type_name() == "Constant" and
               len(op.get_output_shape(0)) >= 3 and op.get_output_shape(0)[0] == 8 and
               op.get_output_element_type(0) in stored]
    assert len(stacked) >= 6  # 3 stacked weights per layer, compressed (int4: down falls back to int8)
    fp32 = (tmp_path / "fp32.bin")
    assert (out / "openvino_model.bin").stat().st_size < 0.6 * _fp32_bin_size(qwen3_dir, fp32.parent)
    ids = np.random.default_rng(4).integers(3, 120, (1, 6)).astype(np.int64)
    assert len(greedy_genai(out, ids, 4)) == 4


@pytest.mark.parametrize("weight_format", ["fp32", "fp16", "int8"])
def test_a_bf16_checkpoint_is_traced_with_16_bit_weights_and_stored_as_asked(tmp_path, weight_format):
    """Released checkpoints are bf16: the torch model keeps them bf16 and computes in f32 (storage.py), the
    trace keeps them bf16 behind Convert; every format then stores what it names and still matches torch."""
    hf = hf_folder(tmp_path / "hf", qwen3moe(), torch.bfloat16)
    out = tmp_path / weight_format
    report = convert(hf, out, weight_format=weight_format, lower="tiled")
    assert len(report.fuse.fused) == 2 and report.proof_worst < 1e-4
    model = ov.Core().read_model(out / "openvino_model.xml")
    kinds = {op.get_output_element_type(0) for op in model.get_ops()
             if op.get_type_name() == "Constant" and len(op.get_output_shape(0)) >= 2}
    want = {"fp32": ov.Type.f32, "fp16": ov.Type.f16, "int8": ov.Type.u8}[weight_format]
    assert want in kinds and ov.Type.bf16 not in kinds, kinds
    ids = np.random.default_rng(5).integers(3, 120, (1, 7)).astype(np.int64)
    tokens = greedy_genai(out, ids, 6)
    if weight_format != "int8":  # bf16 -> f32/f16 is exact at these magnitudes; int8 rounds the weights
        assert tokens == greedy_torch(hf, ids, 6)


def _fp32_bin_size(hf: Path, scratch: Path) -> int:
    out = scratch / "fp32-reference"
    if not out.exists():
        convert(hf, out, lower="tiled")
    return (out / "openvino_model.bin").stat().st_size


class _Disturbed:
    """A patch active only during the trace: the traced logits are 1% of their scale off the torch model's
    (a hook on lm_head; weights cannot be changed and restored, the IR shares their memory with torch)."""

    def __init__(self, model):
        self.head = model.lm_head

    def __enter__(self):
        self.hook = self.head.register_forward_hook(lambda module, args, out: out + 0.01 * out.abs().amax())

    def __exit__(self, *exc):
        self.hook.remove()


def test_a_conversion_that_differs_from_torch_is_refused_and_nothing_is_written(qwen3_dir, tmp_path, monkeypatch):
    from moe_fusion.convert import architectures

    monkeypatch.setattr(architectures, "prepare", lambda model, config: [_Disturbed(model)])
    out = tmp_path / "out"
    with pytest.raises(ConversionError, match=r"differs from torch: prefill 1, prefill of 1: logits differ"):
        convert(qwen3_dir, out)
    assert not out.exists() and not list(tmp_path.iterdir())


def test_a_traced_model_openvino_cannot_run_is_refused_in_one_line(qwen3_dir, tmp_path, monkeypatch):
    from moe_fusion.convert import proof

    def fails(reference, xml):
        raise RuntimeError("Exception from src/inference/src/cpp/infer_request.cpp:224:\nDimension of data input "
                           "shape along 'axis': 2 must be evenly divisible by 'num_splits' attribute value: 3")

    monkeypatch.setattr(proof, "prove_saved", fails)
    out = tmp_path / "out"
    with pytest.raises(ConversionError, match=r"does not run in OpenVINO: Dimension .* 3; nothing written$"):
        convert(qwen3_dir, out)
    assert not out.exists() and not list(tmp_path.iterdir())


def test_bad_inputs_get_one_line_and_exit_2(qwen3_dir, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    dense = tmp_path / "dense"
    dense.mkdir()
    (dense / "config.json").write_text(json.dumps({"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"]}))
    remote = tmp_path / "remote"
    remote.mkdir()
    (remote / "config.json").write_text(json.dumps({"model_type": "x", "num_experts": 8,
                                                    "auto_map": {"AutoModelForCausalLM": "modeling_x.X"}}))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((qwen3_dir / "config.json").read_text())
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    existing = tmp_path / "existing"
    existing.mkdir()
    cases = {empty: "no config.json", dense: "optimum-cli export openvino", remote: "trust_remote_code",
             broken: "the weights do not load"}
    for folder, message in cases.items():
        run = cli("convert", folder, "-o", tmp_path / f"out-{folder.name}")
        assert run.returncode == 2, run.stderr
        errors = [line for line in run.stderr.splitlines() if line.startswith("moe-fusion:")]  # beside progress
        assert len(errors) == 1 and message in errors[0] and "Traceback" not in run.stderr, run.stderr
        assert not (tmp_path / f"out-{folder.name}").exists()
    run = cli("convert", qwen3_dir, "-o", existing)
    assert run.returncode == 2 and "already exists" in run.stderr


def test_an_interrupted_conversion_leaves_no_output(qwen3_dir, tmp_path, monkeypatch):
    import moe_fusion.convert.pipeline as pipeline
    from moe_fusion import lower as lowering

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(lowering, "lower", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pipeline.convert(qwen3_dir, tmp_path / "out")
    assert not list(tmp_path.iterdir())


def test_api_refuses_an_unknown_weight_format(qwen3_dir, tmp_path):
    with pytest.raises(InputError, match="expected one of fp32, fp16, int8, int4"):
        convert(qwen3_dir, tmp_path / "out", weight_format="nf4")
