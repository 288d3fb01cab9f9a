#!/usr/bin/env python
"""Export tiny, random-initialised Hugging Face MoE models to ONNX fixtures, as optimum's ONNX exporter does.

Runs in the gen1 venv (transformers 4.57 + optimum 2.1 + optimum-onnx 0.1; onnxruntime for the exporter's
dynamic-axes fix and its validation run, see models/README.md):

    /work/venvs/gen1/bin/python models/export_onnx.py --out models/fixtures [names...]
    /work/venvs/gen1/bin/python models/export_onnx.py --list

Models are built exactly as for the IR fixtures (`export_hf.build`: config builders and `realistic_init`), saved
with save_pretrained to a temp folder and exported from there with optimum's
`optimum.exporters.onnx.main_export(..., task="text-generation-with-past")`, which is what
`optimum-cli export onnx --model <dir> --task text-generation-with-past <out>` calls. The result is one
self-contained `model.onnx` (no external data: the models are ~1 MB) plus `config.json`, in
`<out>/onnx-<name>/`.

- qwen3moe: optimum-onnx supports `qwen3_moe` natively; its own `Qwen3MoeModelPatcher` replaces the
  "experts hit" loop by a loop over all experts.
- mixtral, qwen2moe: optimum-onnx has no `mixtral` / `qwen2_moe` config ("Trying to export a mixtral model,
  that is a custom or unsupported architecture ..."). Registered as a user would, with the Mistral / Qwen2 ONNX
  config, plus the same all-experts patch optimum applies to Qwen3-MoE (without it the trace keeps only the
  experts the dummy input hit, and the ONNX graph is silently wrong).
"""

import argparse
import contextlib
import importlib
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from export_hf import GEN, SPECS, build  # sibling script: the IR fixtures' config builders and init

KEEP = ("model.onnx", "config.json")


def all_experts_forward(self, hidden_states: torch.Tensor):
    """transformers 4.57's MixtralSparseMoeBlock / Qwen2MoeSparseMoeBlock forward with `for expert_idx in
    range(num_experts)` instead of the data-dependent `expert_hit` loop (optimum's qwen3_moe_forward_patched does
    the same for Qwen3-MoE). Everything else is the original code."""
    batch_size, sequence_length, hidden_dim = hidden_states.shape
    hidden_states = hidden_states.view(-1, hidden_dim)
    router_logits = self.gate(hidden_states)
    routing_weights = torch.nn.functional.softmax(router_logits, dim=1, dtype=torch.float)
    routing_weights, selected_experts = torch.topk(routing_weights, self.top_k, dim=-1)
    if getattr(self, "norm_topk_prob", True):  # Mixtral always renormalises
        routing_weights /= routing_weights.sum(dim=-1, keepdim=True)
    routing_weights = routing_weights.to(hidden_states.dtype)
    final_hidden_states = torch.zeros(
        (batch_size * sequence_length, hidden_dim), dtype=hidden_states.dtype, device=hidden_states.device
    )
    expert_mask = torch.nn.functional.one_hot(selected_experts, num_classes=self.num_experts).permute(2, 1, 0)
    for expert_idx in range(self.num_experts):
        idx, top_x = torch.where(expert_mask[expert_idx].squeeze(0))
        current_state = hidden_states[None, top_x].reshape(-1, hidden_dim)
        current_hidden_states = self.experts[expert_idx](current_state) * routing_weights[top_x, idx, None]
        final_hidden_states.index_add_(0, top_x, current_hidden_states.to(hidden_states.dtype))
    if hasattr(self, "shared_expert"):  # Qwen2-MoE
        shared_expert_output = self.shared_expert(hidden_states)
        shared_expert_output = torch.sigmoid(self.shared_expert_gate(hidden_states)) * shared_expert_output
        final_hidden_states = final_hidden_states + shared_expert_output
    final_hidden_states = final_hidden_states.reshape(batch_size, sequence_length, hidden_dim)
    return final_hidden_states, router_logits


def register(model_type: str, base_config: str, block: str) -> Callable:
    """A setup that registers `model_type` for optimum's ONNX exporter, as a user would: an existing text-decoder
    ONNX config (`base_config`, a class in optimum.exporters.onnx.model_configs) plus a patcher that swaps the
    MoE `block` class's forward for `all_experts_forward` during the export."""

    @contextlib.contextmanager
    def setup():
        from optimum.exporters.onnx import model_configs
        from optimum.exporters.onnx.model_patcher import ModelPatcher
        from optimum.exporters.tasks import TasksManager

        module, name = block.rsplit(".", 1)
        block_class = getattr(importlib.import_module(module), name)

        class AllExpertsPatcher(ModelPatcher):
            def __enter__(self):
                super().__enter__()
                self.original_moe_forward = block_class.forward
                block_class.forward = all_experts_forward

            def __exit__(self, exc_type, exc_value, traceback):
                super().__exit__(exc_type, exc_value, traceback)
                block_class.forward = self.original_moe_forward

        base = getattr(model_configs, base_config)
        config = type(f"{name}OnnxConfig", (base,), {"_MODEL_PATCHER": AllExpertsPatcher})
        TasksManager.create_register("onnx")(model_type, *model_configs.COMMON_TEXT_GENERATION_TASKS)(config)
        yield

    return setup


# spec name (of export_hf.SPECS) -> setup context (None: optimum supports it as is)
ONNX_SPECS: dict[str, Callable | None] = {
    "qwen3moe": None,
    "mixtral": register(
        "mixtral", "MistralOnnxConfig", "transformers.models.mixtral.modeling_mixtral.MixtralSparseMoeBlock"
    ),
    "qwen2moe": register(
        "qwen2_moe", "Qwen2OnnxConfig", "transformers.models.qwen2_moe.modeling_qwen2_moe.Qwen2MoeSparseMoeBlock"
    ),
}


def export(name: str, out_root: Path) -> Path:
    from optimum.exporters.onnx import main_export

    out = Path(out_root) / f"onnx-{name}"
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "hf", Path(tmp) / "onnx"
        build(name, SPECS[name], src)
        with ONNX_SPECS[name]() if ONNX_SPECS[name] else contextlib.nullcontext():
            # == optimum-cli export onnx --model src --task text-generation-with-past dst
            main_export(
                model_name_or_path=str(src), output=dst, task="text-generation-with-past", library_name="transformers"
            )
        if any(p.name not in ("model.onnx",) for p in dst.glob("*.onnx*")) or (dst / "model.onnx_data").exists():
            raise RuntimeError(f"{name}: the exporter wrote external data or several models: {sorted(dst.iterdir())}")
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        for f in KEEP:
            shutil.copy(dst / f, out / f)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(Path(__file__).parent / "fixtures"))
    ap.add_argument("--list", action="store_true")
    ap.add_argument("names", nargs="*", help="spec names (default: all)")
    args = ap.parse_args()
    if GEN != "gen1":
        sys.exit("export_onnx.py runs in the gen1 venv (transformers 4.57, optimum-onnx 0.1)")
    if args.list:
        print(*ONNX_SPECS, sep="\n")
        return
    failed = []
    for n in [n.removeprefix("onnx-") for n in args.names] or list(ONNX_SPECS):
        if n not in ONNX_SPECS:
            sys.exit(f"{n}: not an ONNX spec (have: {', '.join(ONNX_SPECS)})")
        try:
            print(f"[ok] {n} -> {export(n, Path(args.out))}")
        except Exception as e:  # keep going: record failures, export the rest
            failed.append(n)
            print(f"[FAILED] {n}: {type(e).__name__}: {e}", file=sys.stderr)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
