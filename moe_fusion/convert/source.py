"""The Hugging Face folder `convert` reads: checked before anything heavy runs, then loaded in f32.

Refused with one line (InputError, exit 2): no config.json; code shipped with the checkpoint (`auto_map`, which
needs `trust_remote_code`: moe-fusion runs no code from a model folder); an architecture transformers does not
define; a config without MoE experts (optimum-intel converts dense models); weights that do not load.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from moe_fusion.io import InputError, first_line

# Config keys that hold the number of routed experts, across transformers' MoE configs.
EXPERT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts", "num_routed_experts",
               "n_experts", "num_experts_per_tok", "moe_topk", "moe_k")
DENSE = "use `optimum-cli export openvino --task text-generation-with-past` for dense models"


def read_config(folder: Path) -> dict:
    """config.json as a dict, or InputError naming what is wrong."""
    if not folder.is_dir():
        raise InputError(f"{folder}: not a folder (expected a Hugging Face model folder with config.json)")
    path = folder / "config.json"
    if not path.is_file():
        raise InputError(f"{folder}: no config.json (expected a Hugging Face model folder)")
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise InputError(f"{path}: cannot read: {first_line(error)}") from None
    if not isinstance(config, dict):
        raise InputError(f"{path}: not a JSON object")
    if config.get("auto_map"):
        raise InputError(f"{folder}: the model ships its own code (auto_map: needs trust_remote_code); moe-fusion "
                         "does not run code from a model folder: convert an architecture transformers defines")
    return config


def _flat(config: dict) -> dict:
    """The config with nested sections' keys visible at the top: a multimodal wrapper's `text_config`, DBRX's
    `ffn_config` (where its expert count sits)."""
    nested = [config[key] for key in ("text_config", "ffn_config") if isinstance(config.get(key), dict)]
    flat = dict(config)
    for section in nested:
        flat = {**section, **flat}
    return flat


def has_experts(config: dict) -> bool:
    flat = _flat(config)
    return any(isinstance(flat.get(k), int) and not isinstance(flat.get(k), bool) and flat[k] > 0
               for k in EXPERT_KEYS)


def check_source(folder: Path) -> dict:
    """Everything that can be refused before torch loads anything; returns the config dict."""
    config = read_config(folder)
    if not has_experts(config):
        kind = config.get("model_type", "?")
        raise InputError(f"{folder}: {kind} has no MoE experts in its config; {DENSE}")
    return config


def model_class(config: dict) -> Any:
    """The class config.json's `architectures` names (AutoModelForCausalLM has no mapping for some, e.g.
    Mistral 4), else AutoModelForCausalLM."""
    import transformers

    for name in config.get("architectures") or []:
        cls = getattr(transformers, name, None)
        if cls is not None and name.endswith("ForCausalLM"):
            return cls
    return transformers.AutoModelForCausalLM


def load(folder: Path, config: dict) -> Any:
    """The model in eval mode, computing in f32 with its weights as the checkpoint stores them (16-bit weights
    stay 16-bit: storage.py); InputError when the weights do not load."""
    import transformers

    from moe_fusion.convert.storage import SIXTEEN_BIT, checkpoint_dtype, compute_in_f32

    cls = model_class(config)
    try:
        hf_config = transformers.AutoConfig.from_pretrained(folder, trust_remote_code=False)
    except (ValueError, KeyError, OSError) as error:
        raise InputError(f"{folder}: transformers {transformers.__version__} cannot read this config: "
                         f"{first_line(error)}") from None
    from moe_fusion.convert import architectures

    reason = architectures.unsupported(hf_config)
    if reason:
        raise InputError(f"{folder}: {hf_config.model_type}: {reason}")
    try:
        dtype = checkpoint_dtype(_flat(config))
        model = cls.from_pretrained(folder, config=hf_config, dtype=dtype, trust_remote_code=False)
    except Exception as error:  # any failure here is "the weights do not load", said in one line
        raise InputError(f"{folder}: the weights do not load: {type(error).__name__}: {first_line(error)}") from None
    if not any(name.endswith("experts") for name, _ in model.named_modules()):
        raise InputError(f"{folder}: {hf_config.model_type} has no experts module; {DENSE}")
    if dtype in SIXTEEN_BIT:
        compute_in_f32(model)
    return model.eval()
