"""The committed `moe-fusion convert` folders (models/fixtures/deploy-*, made by models/export_convert.py)
deploy as they are: no torch needed here.

- openvino-genai's LLMPipeline with its default backend (PagedAttention on CPU) generates from each folder
  exactly the greedy tokens transformers generated when the fixture was made (expected.json). The prompt is
  25 tokens and 12 are generated, past GPT-OSS's sliding window of 32. Exact equality: the conversion was
  proven within 1e-4 of the logits' scale (measured ~2e-7), f32 inference here; a wrong mask, cache step or
  expert moves logits by > 1e-2 and changes tokens of these random models within a few steps.
- the folder's own openvino tokenizer encodes the prompt to the same ids, and a text prompt generates the
  same tokens through it.
- the IR has optimum-intel's stateful layout and every MoE layer is FusedExperts-lowered to native ops.
"""

import json
from pathlib import Path

import numpy as np
import openvino as ov
import openvino_genai
import pytest

FIXTURES = Path(__file__).resolve().parent.parent / "models" / "fixtures"
FOLDERS = sorted(p.name for p in FIXTURES.glob("deploy-*"))
F32 = {"INFERENCE_PRECISION_HINT": "f32", "DYNAMIC_QUANTIZATION_GROUP_SIZE": "0"}
NO_TOKEN = 1 << 30  # stop on no token: compare exactly as many as transformers generated


def test_there_are_fixtures_of_every_required_architecture():
    assert {"deploy-mixtral", "deploy-qwen3moe", "deploy-deepseekv3", "deploy-glm4moe", "deploy-ernie45moe",
            "deploy-gptoss"} <= set(FOLDERS)


def _pipe(folder: Path):
    pipe = openvino_genai.LLMPipeline(str(folder), "CPU", **F32)
    config = pipe.get_generation_config()
    expected = json.loads((folder / "expected.json").read_text())
    config.max_new_tokens, config.do_sample, config.ignore_eos = len(expected["tokens"]), False, True
    config.eos_token_id, config.stop_token_ids = NO_TOKEN, {NO_TOKEN}
    return pipe, config, expected


@pytest.mark.parametrize("name", FOLDERS)
def test_llm_pipeline_generates_what_transformers_did(name):
    folder = FIXTURES / name
    pipe, config, expected = _pipe(folder)
    ids = np.array([expected["prompt_ids"]], dtype=np.int64)
    result = pipe.generate(openvino_genai.TokenizedInputs(ov.Tensor(ids), ov.Tensor(np.ones_like(ids))), config)
    assert list(result.tokens[0]) == expected["tokens"]


@pytest.mark.parametrize("name", FOLDERS)
def test_the_folders_tokenizer_encodes_and_decodes(name):
    folder = FIXTURES / name
    pipe, config, expected = _pipe(folder)
    tokenizer = pipe.get_tokenizer()
    encoded = tokenizer.encode(expected["prompt"], add_special_tokens=False)
    assert encoded.input_ids.data.tolist() == [expected["prompt_ids"]]
    assert tokenizer.decode(expected["prompt_ids"]) == expected["prompt"]
    config.apply_chat_template = False
    text = pipe.generate(expected["prompt"], config)
    assert text == tokenizer.decode(expected["tokens"])


@pytest.mark.parametrize("name", FOLDERS)
def test_the_ir_has_optimums_stateful_layout_and_only_native_ops(name):
    model = ov.Core().read_model(FIXTURES / name / "openvino_model.xml")  # a plain Core: no FusedExperts op
    names = [sorted(i.get_names()) for i in model.inputs]
    assert names == [["input_ids"], ["attention_mask"], ["position_ids"], ["beam_idx"]]
    assert [i.get_partial_shape().to_string() for i in model.inputs] == ["[?,?]", "[?,?]", "[?,?]", "[?]"]
    assert [sorted(o.get_names()) for o in model.outputs] == [["logits"]]
    config = json.loads((FIXTURES / name / "config.json").read_text())
    reads = [op for op in model.get_ops() if op.get_type_name() == "ReadValue"]
    assert len(reads) == len(model.get_sinks()) == 2 * config["num_hidden_layers"]
    for read in reads:  # zero initialiser, then reordered by beam_idx
        assert read.input_value(0).get_node().get_type_name() == "Broadcast"
        gathers = [t.get_node() for t in read.output(0).get_target_inputs()]
        assert [g.get_type_name() for g in gathers] == ["Gather"]
        assert gathers[0].input_value(1).get_node().get_friendly_name() == "beam_idx"
    assert not [op for op in model.get_ops() if op.get_type_name() == "FusedExperts"]
    report = json.loads((FIXTURES / name / "moe_fusion_report.json").read_text())
    assert [b["status"] for b in report["blocks"]] == ["fused"] * config["num_hidden_layers"]
    forms = model.get_rt_info(["moe_fusion", "lowering", "forms"]).astype(str)
    native = {"tiled", "grouped", "per-expert"}
    hybrids = {f"hybrid({prefill}/{decode})" for prefill in native for decode in native}  # auto on CPUs without AMX
    assert forms and set(forms.split(",")) <= native | hybrids
