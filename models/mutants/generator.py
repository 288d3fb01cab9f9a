"""Making mutants: a fresh read of one fixture with ONE operator's change in one of its MoE blocks.

Deterministic: mutant i depends only on (seed, i, fixtures, operators). Operators are taken round-robin so a
run of N >= len(OPERATORS) mutants exercises every one; the fixture is drawn at random among those where
the operator finds a site.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import openvino as ov

from models.mutants.edits import Change
from models.mutants.engine_api import first_line, read_model
from models.mutants.operators import OPERATORS
from models.mutants.sites import Site, sites

FIXTURES_DIR = Path(__file__).resolve().parent.parent / "fixtures"
FIXTURES = tuple(sorted(p.name for p in FIXTURES_DIR.iterdir() if p.is_dir()))


@dataclass
class Mutant:
    name: str  # "0007-gen1-mixtral-activation": index, fixture, operator
    fixture: str
    operator: str
    description: str  # what was changed, naming the node
    block: str  # the mutated block's name as the fuse report gives it
    expect: str  # "fused" | "declined" | "" (either may be right)
    model: ov.Model | None  # None: OpenVINO rejected the mutated graph
    rejected: str = ""  # OpenVINO's message when it did
    family: str = ""  # the mutated block's family on the unmutated fixture

    def __iter__(self):  # name, description, model = mutant
        return iter((self.name, self.description, self.model))


class NoSite(ValueError):
    """The operator finds nothing to change in any of the fixtures it was given."""


def fixture_path(name: str) -> Path:
    folder = FIXTURES_DIR / name
    xml = folder / "openvino_model.xml"
    return xml if xml.is_file() else folder / "model.onnx"


def mutate(fixture: str, operator: str, rng: np.random.Generator) -> tuple[ov.Model, Site, Change] | None:
    """A fresh read of `fixture` with one mutation by `operator` in one of its blocks; None if no site."""
    model = read_model(fixture_path(fixture))
    found = sites(model)
    for site in (found[i] for i in rng.permutation(len(found))):
        change = OPERATORS[operator](site, rng)
        if change is not None:
            return model, site, change
    return None


_BARREN: set[tuple[str, str]] = set()  # (fixture, operator) pairs where the operator finds no site


def check_operators(operators: Iterable[str]) -> list[str]:
    names = list(operators)
    unknown = sorted(set(names) - set(OPERATORS))
    if unknown:
        raise ValueError(f"unknown mutation operators {unknown}; known: {', '.join(OPERATORS)}")
    return names


def mutant(
    seed: int, index: int, fixtures: Iterable[str] | None = None, operators: Iterable[str] | None = None
) -> Mutant:
    """Mutant `index` of the run `seed`: operator `index` round-robin, fixture drawn among those where it
    applies. OpenVINO's rejection (validation) is recorded in `rejected` with `model=None`. Raises `NoSite`
    when the operator applies to none of `fixtures`."""
    fixtures = list(fixtures or FIXTURES)
    names = check_operators(operators or OPERATORS)
    operator = names[(index + seed) % len(names)]
    order = np.random.default_rng([seed, index]).permutation(len(fixtures))
    for attempt, fixture in enumerate(fixtures[j] for j in order):
        if (fixture, operator) in _BARREN:
            continue
        made = mutate(fixture, operator, np.random.default_rng([seed, index, attempt]))
        if made is None:
            _BARREN.add((fixture, operator))
            continue
        model, site, change = made
        found = Mutant(f"{index:04d}-{fixture}-{operator}", fixture, operator, change.description, site.name,
                       change.expect, model, family=site.family)
        try:
            model.validate_nodes_and_infer_types()
        except (RuntimeError, ValueError) as error:
            found = dataclasses.replace(found, model=None, rejected=first_line(error))
        return found
    raise NoSite(f"operator {operator} finds nothing to change in {', '.join(fixtures)}")


def mutants(
    seed: int = 0,
    count: int = 200,
    fixtures: Iterable[str] | None = None,
    operators: Iterable[str] | None = None,
    start: int = 0,
) -> Iterator[Mutant]:
    """Mutants `start` .. `start + count - 1` of the run `seed` (see `mutant`): every operator once per
    len(OPERATORS) mutants. A run split into ranges gives the same mutants as one run."""
    fixtures, operators = list(fixtures or FIXTURES), list(operators or OPERATORS)
    for index in range(start, start + count):
        yield mutant(seed, index, fixtures, operators)
