"""The deployment client: openvino-genai's LLMPipeline (C++, no Python op can run there) generates from lowered
fixture folders exactly what it generates from the original folders.

One fixture per family, lowered by the default target for both choices it can make (per-expert for a CPU
without AMX when the experts are large, the GatherMatmul form otherwise; either must deploy wherever the
folder goes: the CPU facts are injected so both choices run on any machine).
Token ids go in as `TokenizedInputs` (the fixtures have no tokenizer), greedy, 8 new tokens, f32 inference
without dynamic activation quantisation (int4 FullyConnected quantises activations on the fly, GatherMatmul
does not: ~1e-2 apart with it on).
Equality of the ids is exact: lowering moves the logits by <= 4e-7 of their scale (tests/test_lower.py), so a
differing id would need a near-tie that small in these random models; a wrong expert or routing weight moves
them by > 1e-2. (The GPT-OSS fixtures decode one repeated token from any prompt, so for that family the test
shows deployability; test_lower.py's check compares its logits.)
"""

from pathlib import Path

import numpy as np
import openvino as ov
import openvino_genai
import pytest

from moe_fusion.fusing import fuse
from moe_fusion.io import load, save
from moe_fusion.lower import AUTO, HYBRID, PER_EXPERT, TILED, CpuFacts, lower
from moe_fusion.runtime import F32  # f32, dynamic activation quantisation off (as check compares)

FIXTURES = Path(__file__).resolve().parent.parent / "models" / "fixtures"
FAMILIES = {  # one fixture per family (and the compressed path)
    "per_expert_loop": "gen1-qwen3moe",
    "tiled": "gen2-qwen3moe",
    "gptoss": "gen1-gptoss",
    "sort_and_slice": "gen1-granitemoe",
    "llama4": "gen1-llama4",
    "deepseek (loop, sigmoid router)": "gen1-deepseekv3",
    "int4 compressed": "gen1-mixtral-int4-g16-sym",
}
CPUS = {"no-amx": (CpuFacts(amx=False, precision="f32"), (HYBRID, PER_EXPERT)),  # per-expert for int4 weights
        "gathermatmul": (CpuFacts(amx=True, precision="bf16"), (TILED, TILED))}
NO_TOKEN = 1 << 30  # the fixtures' generation configs name no eos token: stop on none (FIELD_NOTES §4)


def generate(folder: Path, ids: np.ndarray, new_tokens: int = 8) -> list[int]:
    pipe = openvino_genai.LLMPipeline(str(folder), "CPU", **F32)
    config = pipe.get_generation_config()
    config.max_new_tokens, config.do_sample, config.ignore_eos = new_tokens, False, True
    config.eos_token_id, config.stop_token_ids = NO_TOKEN, {NO_TOKEN}
    result = pipe.generate(openvino_genai.TokenizedInputs(ov.Tensor(ids), ov.Tensor(np.ones_like(ids))), config)
    return list(result.tokens[0])


@pytest.mark.parametrize("cpu", sorted(CPUS))
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_llm_pipeline_generates_the_same_tokens_from_the_lowered_folder(family, cpu, tmp_path):
    fixture = FIXTURES / FAMILIES[family]
    facts, forms = CPUS[cpu]
    form = forms[1] if "int4" in family and not facts.amx else forms[0]  # int4 without AMX: per-expert
    model = load(fixture)
    assert fuse(model, verify=False).fused
    report = lower(model, AUTO, cpu=facts)
    assert all(f.startswith(form) for f in report.lowered.values())  # GPT-OSS, zero biases: grouped on AMX
    folder = save(model, fixture, tmp_path / "lowered")
    ids = np.random.default_rng(0).integers(3, 200, (1, 7)).astype(np.int64)
    want = generate(fixture, ids)
    assert len(want) == 8
    assert generate(folder, ids) == want
