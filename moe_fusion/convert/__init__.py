"""`moe-fusion convert`: a Hugging Face MoE model folder -> a stateful, fused, proven folder openvino-genai runs.

    from moe_fusion.convert import convert
    report = convert("hf_model_dir", "out", weight_format="int4")

Optional: needs torch and transformers (`pip install "moe-fusion[convert]"`); torch is imported only inside this
package, and only when a conversion runs, so `import moe_fusion.convert` itself is cheap.
"""

from __future__ import annotations

from typing import Any

__all__ = ["WEIGHT_FORMATS", "convert", "convert_model"]

WEIGHT_FORMATS = ("fp32", "fp16", "int8", "int4", "int4-sym")


def convert(hf_dir, out, *, weight_format: str = "fp32", lower: str | None = "auto", force: bool = False,
            progress=None) -> Any:
    """Convert the Hugging Face folder `hf_dir` into the deployable folder `out` (see pipeline.convert)."""
    from moe_fusion.convert.pipeline import convert as run

    return run(hf_dir, out, weight_format=weight_format, lower=lower, force=force, progress=progress)


def __getattr__(name: str) -> Any:
    if name in ("convert_model", "conversion_fixes", "traceable_sdpa_mask", "traceable_eager_mask", "Logits"):
        from moe_fusion.convert import fixes

        return getattr(fixes, name)
    raise AttributeError(name)
