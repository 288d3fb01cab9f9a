"""moe_fusion/convert/source.py's checks before anything heavy runs (no torch needed)."""

import json

import pytest

from moe_fusion.convert.source import check_source, has_experts
from moe_fusion.io import InputError


@pytest.mark.parametrize("config", [{"num_local_experts": 8}, {"text_config": {"num_experts": 64}},
                                    {"ffn_config": {"moe_num_experts": 16, "moe_top_k": 4}}])  # DBRX nests it
def test_the_expert_count_is_found_where_configs_keep_it(config):
    assert has_experts(config)


@pytest.mark.parametrize("config", [{"num_experts": 0}, {"ffn_config": {"ffn_hidden_size": 40}}, {"num_experts": True}])
def test_a_config_without_experts_is_dense(config):
    assert not has_experts(config)


def test_a_dense_folder_is_refused_with_what_to_use_instead(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3", "ffn_config": {"ffn_hidden_size": 8}}))
    with pytest.raises(InputError, match="no MoE experts in its config; use `optimum-cli export openvino"):
        check_source(tmp_path)
