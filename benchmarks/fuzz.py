"""Mutation fuzzing: fuse seeded mutants of the real-export fixtures and assert no fusion is wrong.

    python benchmarks/fuzz.py --count 300 --seed 0 [--start 0] [--fixtures gen1-mixtral,gen2-gptoss]
                              [--operators topk,clamp] [--tokens 1,16] [--steps 1] [--jobs 1] [--json fuzz.json] [-v]

Each mutant (`models/mutants/`) is a fresh read of one fixture with one graph mutation in one MoE block,
made and judged in the engine's worker process (replaced every 16 mutants: OpenVINO's pattern objects leak
memory). It is fused (verification on, as `moe-fusion fuse` runs), then `moe_fusion.check` compares the
fused model with the mutant itself. Outcomes: fused (the mutated block fused and check passed), declined
(the mutated block kept as ops, with a reason), broken (declined as a broken export, which check refuses
as an original), unreported, rejected (OpenVINO refuses or cannot run the mutant), crashed (the judging
process died natively; the stage is named: generate, fuse, check-original, check-fused, reference),
generator failed (no mutant made), WRONG (fused but not equivalent, a fused block of a broken export, a
skipped block without a reason, or an exception). Prints one row per operator, one per family of the
mutated block, and the tally; exit 1 on any WRONG or generator failure. "missed" counts declines of
mutants a correct fusion could have fused.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from models.mutants import OPERATORS, OUTCOMES, Verdict, judge_many


def table(verdicts: list[Verdict], by: str = "operator") -> str:
    """Markdown table: mutants per operator (or per `family` of the mutated block) and outcome, plus the
    total row."""
    rows: dict[str, Counter] = defaultdict(Counter)
    fixtures = defaultdict(set)
    for v in verdicts:
        row = getattr(v.mutant, by) or "?"
        rows[row][v.outcome] += 1
        rows[row]["missed"] += v.missed
        fixtures[row].add(v.mutant.fixture)
    header = [by, "mutants", *OUTCOMES, "missed", "fixtures"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    order = [o for o in OPERATORS if o in rows] if by == "operator" else sorted(rows)
    total = Counter()
    for name in order:
        counts = rows[name]
        n = sum(counts[o] for o in OUTCOMES)
        total.update(counts)
        cells = [name, str(n), *(str(counts[o]) for o in OUTCOMES), str(counts["missed"]), str(len(fixtures[name]))]
        lines.append("| " + " | ".join(cells) + " |")
    n = sum(total[o] for o in OUTCOMES)
    all_fixtures = {v.mutant.fixture for v in verdicts}
    cells = ["**total**", str(n), *(str(total[o]) for o in OUTCOMES), str(total["missed"]), str(len(all_fixtures))]
    lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--start", type=int, default=0, help="index of the first mutant (to split a run)")
    parser.add_argument("--fixtures", default="", help="comma-separated fixture names (default: all)")
    parser.add_argument("--operators", default="", help=f"comma-separated, of: {', '.join(OPERATORS)}")
    parser.add_argument("--tokens", default="1,16", help="check's prefill token counts")
    parser.add_argument("--steps", type=int, default=1, help="check's decode steps")
    parser.add_argument("--reference", action="store_true",
                        help="also compare each fused mutated block with Model.evaluate (may crash on some mutants)")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes (each mutant compiles models)")
    parser.add_argument("--json", type=Path, help="write every verdict here")
    parser.add_argument("--verbose", "-v", action="store_true", help="one line per mutant")
    args = parser.parse_args(argv)
    tokens = [int(t) for t in args.tokens.split(",") if t]
    fixtures = [f for f in args.fixtures.split(",") if f] or None
    operators = [o for o in args.operators.split(",") if o] or None

    start = time.perf_counter()
    verdicts: list[Verdict] = []
    indices = range(args.start, args.start + args.count)
    for verdict in judge_many(args.seed, indices, fixtures, operators, tokens, args.steps, jobs=args.jobs,
                              reference=args.reference):
        verdicts.append(verdict)
        mutant = verdict.mutant
        if args.verbose or verdict.outcome in ("WRONG", "crashed", "generator failed"):
            print(f"{verdict.outcome:8} {verdict.seconds:5.1f}s {mutant.name}: {mutant.description} -> "
                  f"{verdict.detail[:300]}", flush=True)
        else:
            print(f"\r{len(verdicts)}/{args.count}", end="", file=sys.stderr, flush=True)
    seconds = time.perf_counter() - start
    print(file=sys.stderr)

    print(table(verdicts))
    print()
    print(table(verdicts, by="family"))
    tally = Counter(v.outcome for v in verdicts)
    each = seconds / max(len(verdicts), 1)
    print(f"\nseed {args.seed}: {len(verdicts)} mutants in {seconds:.0f} s ({each:.2f} s each): "
          + ", ".join(f"{tally[o]} {o}" for o in OUTCOMES) + f"; {sum(v.missed for v in verdicts)} missed")
    for v in verdicts:
        if v.outcome in ("WRONG", "crashed", "generator failed"):
            print(f"{v.outcome} {v.mutant.name}: {v.mutant.description}\n    block {v.mutant.block}: {v.detail}")
    if args.json:
        rows = [
            {
                "name": v.mutant.name, "fixture": v.mutant.fixture, "operator": v.mutant.operator,
                "description": v.mutant.description, "block": v.mutant.block, "expect": v.mutant.expect,
                "family": v.mutant.family, "outcome": v.outcome, "stage": v.stage, "detail": v.detail,
                "blocks_fused": v.blocks_fused,
                "seconds": round(v.seconds, 2),
            }
            for v in verdicts
        ]
        args.json.write_text(json.dumps({"seed": args.seed, "seconds": round(seconds, 1), "mutants": rows}, indent=2))
    return 1 if tally["WRONG"] or tally["generator failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
