"""moe_fusion/convert/architectures.py and patches.py: which architectures `convert` refuses, and the sliding-window
mask that survives openvino-genai's PagedAttention rewrite (needs torch and transformers).

The genai side (a deployed sliding-window folder generating transformers' tokens under the default PagedAttention
backend) is tests/test_convert_fixtures.py on deploy-exaonemoe and deploy-cohere2moe (window 4, 11-token prompt).
"""

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
import openvino as ov  # noqa: E402
from openvino._offline_transformations import paged_attention_transformation  # noqa: E402
from transformers import masking_utils  # noqa: E402

from moe_fusion.convert import architectures, patches  # noqa: E402


@pytest.mark.parametrize("kind", ["qwen3_next", "jamba", "nemotron_h", "granitemoehybrid", "lfm2_moe", "kimi_linear",
                                  "deepseek_v32", "glm_moe_dsa", "deepseek_v4", "llama4", "jetmoe",
                                  "qwen3_5_moe_text"])
def test_recurrent_and_sparse_attention_architectures_are_refused_in_one_line(kind):
    reason = architectures.unsupported(type("Config", (), {"model_type": kind})())
    assert reason and "\n" not in reason and reason.startswith("not supported: ")


@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe", "deepseek_v3", "gpt_oss", "mistral4", "cohere2_moe"])
def test_attention_architectures_are_tried(kind):
    assert architectures.unsupported(type("Config", (), {"model_type": kind})()) is None


def test_an_afmoe_whose_every_layer_slides_is_refused_and_the_released_layout_is_not():
    every = transformers.AfmoeConfig(num_hidden_layers=2, layer_types=["sliding_attention"] * 2)
    released = transformers.AfmoeConfig(num_hidden_layers=4)  # every 4th layer full
    assert "PagedAttention" in architectures.unsupported(every)
    assert architectures.unsupported(released) is None


def test_sliding_layers_are_detected_from_the_config():
    assert architectures.has_sliding_layers(transformers.MixtralConfig(sliding_window=4))
    assert not architectures.has_sliding_layers(transformers.MixtralConfig(sliding_window=None))
    full = transformers.Cohere2MoeConfig(num_hidden_layers=2, layer_types=["full_attention"] * 2, sliding_window=4)
    assert not architectures.has_sliding_layers(full)


def _transformers_mask(batch, q_length, kv_length, q_offset, attention_mask, window):
    """transformers' own sliding-window sdpa mask through the registered interface (5.23 signature; 5.5 takes
    `cache_position` instead of q_length/q_offset)."""
    function = masking_utils.ALL_MASK_ATTENTION_FUNCTIONS["sdpa"]
    common = dict(batch_size=batch, kv_length=kv_length, kv_offset=0, allow_is_causal_skip=False,
                  mask_function=masking_utils.sliding_window_causal_mask_function(window),
                  attention_mask=attention_mask.bool(), local_size=window, dtype=torch.float32)
    try:
        return function(q_length=q_length, q_offset=q_offset, **common)
    except TypeError:
        return function(cache_position=torch.arange(q_length) + q_offset, **common)


@pytest.mark.parametrize("q_length,q_offset,padding", [(7, 0, 0), (1, 9, 0), (3, 5, 2)])
def test_the_sliding_mask_has_transformers_values(q_length, q_offset, padding):
    """Exact: the same keys allowed per query as transformers' own sdpa_mask (booleans, no tolerance)."""
    window, batch, kv_length = 4, 2, q_offset + q_length
    attention_mask = torch.ones((batch, kv_length), dtype=torch.long)
    attention_mask[1, :padding] = 0  # left padding in the second row
    theirs = _transformers_mask(batch, q_length, kv_length, q_offset, attention_mask, window)
    ours = patches.sliding_mask(batch, q_length, kv_length, q_offset, 0, attention_mask, window=window)
    allowed = (ours == 0).numpy()
    rows = theirs.numpy().any(-1)  # rows with no allowed key: ours attends nowhere too (min everywhere)
    assert np.array_equal(allowed[rows], theirs.numpy()[rows])
    assert not allowed[~rows].any()


FIXTURES = Path(__file__).resolve().parent.parent / "models" / "fixtures"


@pytest.mark.parametrize("name", ["deploy-cohere2moe", "deploy-exaonemoe"])
def test_paged_attention_reads_the_window_of_the_sliding_layer_only(name):
    """OpenVINO's SDPAToPagedAttention (what LLMPipeline runs) gives PagedAttention a window computed from the mask
    it recognises (-1 x the mask's offset, 4 here) and the constant 0 (no window) to anything else: layer 0 slides,
    layer 1 attends to everything. Converted without patches.py, layer 0 gets 0 too, and genai's tokens differ
    from transformers' from the first one past the window (tests/test_convert_fixtures.py)."""
    model = ov.Core().read_model(FIXTURES / name / "openvino_model.xml")
    paged_attention_transformation(model, False, False)
    windows = []
    for op in model.get_ordered_ops():
        if op.get_type_name() == "PagedAttentionExtension":
            window = op.input_value(10)
            folded = ov.Model([ov.opset13.result(window)], [])  # the window subgraph is constants only
            windows.append(int(ov.Core().compile_model(folded, "CPU")({})[0]))
    assert windows == [4, 0]
