"""The `batched_mm` form's own plumbing (transformers' `batched_mm` experts traced by `convert_model`):

    ids = Clamp(Reshape(top-k ids), 0, E-1)                     # the expert-id Clamp
    W_e = Gather(W [E, ...], Convert(ids), axis 0)              # each routed row's expert weights
    out = Select(ids >= E, fill, expert rows * routing weight)  # masked_fill, never true on sound ids

The operators reach experts here by editing the stacked constant, the Gather's ids, the Clamp bounds or the
masked_fill threshold and value."""

from __future__ import annotations

import openvino as ov

from models.mutants.engine_api import strip
from models.mutants.sites import Site, const_data, gathered_weight


def weight_gathers(site: Site) -> list[ov.Node]:
    """The Gathers reading rows of a stacked weight constant at the routed expert ids."""
    return [g for g in site.of_type("Gather") if gathered_weight(g.output(0)) is not None]


def id_clamps(site: Site) -> list[ov.Node]:
    """Clamps of the expert ids to [0, E-1] (integer or float bounds: the Clamp op keeps them as floats)."""
    found = []
    for node in site.of_type("Clamp"):
        attrs = node.get_attributes()
        if float(attrs["min"]) == 0.0 and float(attrs["max"]) == site.num_experts - 1:
            found.append(node)
    return found


def mask_thresholds(site: Site) -> list[tuple[ov.Node, int]]:
    """(GreaterEqual, port of its constant E): masked_fill's `ids >= E` test."""
    found = []
    for node in site.of_type("GreaterEqual"):
        for port in (0, 1):
            data = const_data(node.input_value(port))
            if data is not None and data.size == 1 and int(data.reshape(-1)[0]) == site.num_experts:
                found.append((node, port))
    return found


def fill_values(site: Site) -> list[tuple[ov.Node, int]]:
    """(Select, port 1): masked_fill's constant fill value, when the Select's mask is the `ids >= E` test."""
    tests = {n.get_instance_id() for n, _ in mask_thresholds(site)}
    found = []
    for node in site.of_type("Select"):
        data = const_data(node.input_value(1))
        mask = strip(node.input_value(0)).get_node()
        if data is not None and data.size == 1 and mask.get_instance_id() in tests:
            found.append((node, 1))
    return found
