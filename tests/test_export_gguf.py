"""models/export_gguf.py's `hf_layer_weights` reads the experts transformers saves, for both layers the llama.cpp
peer uses: Qwen3-MoE (`mlp.experts.N.gate_proj/up_proj/down_proj`) and Mixtral
(`block_sparse_moe.experts.N.w1/w3/w2`), against the stacked `gate_up_proj`/`down_proj` the loaded model holds.
Small configs; the real shapes are what models/export_gguf.py writes."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from models.bench_models import SYM_ZERO  # noqa: E402
from models.export_gguf import LAYERS, config, hf_layer_weights  # noqa: E402

SMALL = dict(vocab_size=64, hidden_size=256, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
             head_dim=16, num_experts_per_tok=2)


def _saved(tmp_path, cfg):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(tmp_path)
    return model.model.layers[0].mlp


@pytest.mark.parametrize("kind", ["qwen3", "mixtral"])
def test_hf_layer_weights_reads_saved_experts(tmp_path, kind):
    if kind == "qwen3":
        cfg = transformers.Qwen3MoeConfig(**SMALL, moe_intermediate_size=128, intermediate_size=512, num_experts=4,
                                          norm_topk_prob=False)
    else:
        cfg = transformers.MixtralConfig(**SMALL, intermediate_size=128, num_local_experts=4)
    mlp = _saved(tmp_path, cfg)
    i = 128
    gate_up, down = mlp.experts.gate_up_proj.detach(), mlp.experts.down_proj.detach()  # [E, 2I, H], [E, H, I]
    assert tuple(gate_up.shape) == (4, 2 * i, 256)
    w = hf_layer_weights(tmp_path, "f16")
    assert (w.shape.hidden, w.shape.intermediate, w.shape.experts, w.shape.top_k) == (256, i, 4, 2)
    assert w.shape.normalize == (kind == "mixtral")  # Mixtral always renormalises; Qwen3 as its config says
    for got, want in ((w.gate, gate_up[:, :i]), (w.up, gate_up[:, i:]), (w.down, down)):
        np.testing.assert_array_equal(got, want.to(torch.float16).numpy())
    np.testing.assert_array_equal(w.router, mlp.gate.weight.detach().float().numpy())

    sym = hf_layer_weights(tmp_path, "int4-sym")  # quantised from the same values (a few experts at a time)
    scale, zero = sym.scales["gate"]
    assert zero is None
    values = (sym.gate.astype(np.float32) - SYM_ZERO) * scale.astype(np.float32)  # [E, out, groups, 128]
    error = np.abs(values - w.gate.astype(np.float32).reshape(values.shape))
    assert (error <= scale.astype(np.float32) * 1.001).all()  # half a step, a whole one where +8 clips to +7


def test_configs_at_the_real_shapes():
    mixtral = config("mixtral")
    assert (mixtral.hidden_size, mixtral.intermediate_size, mixtral.num_local_experts, mixtral.num_experts_per_tok,
            mixtral.num_attention_heads, mixtral.num_key_value_heads, mixtral.head_dim) == (4096, 14336, 8, 2, 32, 8,
                                                                                          128)
    qwen3 = config("qwen3", 1, 1)
    assert (qwen3.hidden_size, qwen3.moe_intermediate_size, qwen3.num_experts, qwen3.num_attention_heads) == \
        (2048, 768, 128, 1)
    assert set(LAYERS) == {"qwen3", "mixtral"}
