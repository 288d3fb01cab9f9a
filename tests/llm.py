"""Running exported LLM fixtures the way users do: a prefill, then decode steps with the KV cache.

The helper lives in the package (`moe_fusion.testing.generate_logits`); this module keeps the tests' import.
"""

from moe_fusion.runtime import F32
from moe_fusion.testing import generate_logits

__all__ = ["F32", "generate_logits"]
