"""Judging many mutants, each made and judged in the engine's worker process (`moe_fusion.isolate.Worker`),
so that a native crash in OpenVINO costs one verdict, names the stage it happened in, and leaves the run
going. The worker is replaced every `per_child` mutants: building OpenVINO patterns leaks memory (each
`openvino.passes.WrapType` keeps ~1.5 KB per type name; ~47 MB per `fuse` on the fixtures), which a long
run in one process would pile up to many GB.

Each worker writes the stage it is in (and, once made, the mutant's description) to a small file of its
own before entering the stage; when the worker dies, that file says where and on what.
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from models.mutants.engine_api import Worker, WorkerCrash
from models.mutants.generator import FIXTURES, Mutant, NoSite, check_operators, mutant
from models.mutants.operators import OPERATORS
from models.mutants.oracle import Verdict, judge


@dataclass(frozen=True)
class Task:
    seed: int
    index: int
    fixtures: tuple[str, ...]
    operators: tuple[str, ...]
    tokens: tuple[int, ...]
    steps: int
    reference: bool
    crash_at: str = ""  # test hook: the worker kills itself (SIGSEGV) on entering this stage


def _stub(task: Task, description: str) -> Mutant:
    return Mutant(f"{task.index:04d}-?", "?", "?", description, "", "", None)


def judge_task(task: Task, stage_file: str) -> Verdict:
    """Make and judge one mutant (runs in the worker process)."""
    info: dict = {"stage": "", "mutant": None}

    def enter(stage: str) -> None:
        info["stage"] = stage
        Path(stage_file).write_text(json.dumps(info))
        if stage == task.crash_at:
            os.kill(os.getpid(), signal.SIGSEGV)

    enter("generate")
    try:
        made = mutant(task.seed, task.index, task.fixtures, task.operators)
    except NoSite as error:
        return Verdict(_stub(task, "generator failed"), "generator failed", str(error))
    except Exception as error:  # the generator's own failure: reported, never counted as a pass
        return Verdict(_stub(task, "generator failed"), "generator failed", f"mutant generation raised: {error!r}")
    info["mutant"] = {k: getattr(made, k) for k in ("name", "fixture", "operator", "description", "block",
                                                     "expect", "family")}
    return judge(made, tokens=task.tokens, steps=task.steps, reference=task.reference, enter=enter)


def _crashed(task: Task, stage_file: Path, error: WorkerCrash) -> Verdict:
    try:
        info = json.loads(stage_file.read_text())
    except (OSError, ValueError):
        info = {"stage": "", "mutant": None}
    stage = info.get("stage") or "start"
    found = Mutant(**info["mutant"], model=None) if info.get("mutant") else _stub(task, "not made")
    return Verdict(found, "crashed", f"crashed at {stage}: the judging process was {error}", stage=stage)


class _Slot:
    """One worker process and its stage file."""

    def __init__(self, folder: str, number: int) -> None:
        self.worker = Worker()
        self.stage_file = Path(folder) / f"stage-{number}.json"
        self.done = 0
        self.task: Task | None = None

    def send(self, task: Task) -> None:
        self.stage_file.write_text("{}")
        self.task = task
        self.worker.send(judge_task, task, str(self.stage_file))

    def receive(self, per_child: int) -> Verdict:
        try:
            verdict = self.worker.receive()
        except WorkerCrash as error:  # the next send starts a fresh worker
            verdict = _crashed(self.task, self.stage_file, error)
        self.done += 1
        if self.done % max(per_child, 1) == 0:
            self.worker.stop()
        return verdict


def judge_many(
    seed: int,
    indices: Iterable[int],
    fixtures: Iterable[str] | None = None,
    operators: Iterable[str] | None = None,
    tokens: Iterable[int] = (1, 16),
    steps: int = 1,
    jobs: int = 1,
    per_child: int = 16,
    reference: bool = False,
    crash_at: str = "",
) -> Iterator[Verdict]:
    """Verdicts of mutants `indices` of the run `seed`, in order, `jobs` at a time in worker processes.
    `crash_at` (tests only): every worker kills itself natively on entering that stage."""
    fixtures = tuple(fixtures or FIXTURES)
    operators = tuple(check_operators(operators or OPERATORS))
    tasks = [Task(seed, i, fixtures, operators, tuple(tokens), steps, reference, crash_at) for i in indices]
    with tempfile.TemporaryDirectory(prefix="moe-fuzz-") as folder:
        slots = [_Slot(folder, n) for n in range(max(jobs, 1))]
        try:
            for begin in range(0, len(tasks), len(slots)):
                batch = list(zip(slots, tasks[begin : begin + len(slots)], strict=False))
                for slot, task in batch:
                    slot.send(task)
                for slot, _task in batch:
                    yield slot.receive(per_child)
        finally:
            for slot in slots:
                slot.worker.stop()
