"""Mutants of the real-export fixtures: each a fresh read of one fixture with ONE random graph mutation inside
one of its MoE blocks, for fuzzing the fusion (`benchmarks/fuzz.py`, `tests/test_fuzz.py`).

    for mutant in mutants(seed=0, count=200):
        mutant.name, mutant.description, mutant.model      # model is None when OpenVINO rejected the mutation

Modules: `sites` (where the operators look: each block's ops and experts), `edits` (editing helpers),
`operators/` (16 operators in groups: experts, routing, graph; `batched` holds the `batched_mm` plumbing
they reach), `generator` (seeded, deterministic mutants), `oracle` (the verdict on one mutant, the stages it
passes through) and `harness` (many verdicts, each in the engine's worker process; a native crash names its
stage). `engine_api` is the one place that imports the engine.

Each operator's `expect` is what a correct fusion should do ("fused", "declined", or "" when either can be
right). It is informational: the verdict is `moe_fusion.check` of the fused mutant against the mutant itself.
"""

from models.mutants.edits import Change
from models.mutants.generator import FIXTURES, Mutant, NoSite, fixture_path, mutant, mutants, mutate
from models.mutants.harness import judge_many
from models.mutants.operators import OPERATORS
from models.mutants.oracle import OUTCOMES, STAGES, Verdict, judge, same_block
from models.mutants.sites import Site, sites

__all__ = [
    "FIXTURES",
    "OPERATORS",
    "OUTCOMES",
    "STAGES",
    "Change",
    "Mutant",
    "NoSite",
    "Site",
    "Verdict",
    "fixture_path",
    "judge",
    "judge_many",
    "mutant",
    "mutants",
    "mutate",
    "same_block",
    "sites",
]
