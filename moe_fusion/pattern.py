"""The pattern API that families in `patterns/` are written in: thin helpers over `openvino.passes`.

Patterns are built from `op`, `any_input`, `const`, `either` and `reshaped`; naming a node (`name=...`)
makes its matched value retrievable from `match(pattern, output)`, which runs OpenVINO's `Matcher`.
Op names are version-free: `op("TopK", ...)` matches TopK-1, -3 and -11 alike.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator

import numpy as np
import openvino as ov
from openvino.passes import AnyInput, Matcher, Or, WrapType

from moe_fusion.compressed import Compressed, is_plain, is_weight

# `same` and `strip` are part of the pattern API families are written in; they live in moe_fusion.graph
from moe_fusion.graph import LAYOUT
from moe_fusion.graph import same as same
from moe_fusion.graph import strip as strip

Pattern = ov.Node
_NAME_PREFIX = "moe_fusion:"


@functools.cache
def versions(type_name: str) -> tuple[str, ...]:
    """Every `opsetN.Name` spelling that resolves: op versions are distinct types to the matcher."""
    found = []
    for v in range(1, 17):
        try:
            WrapType(f"opset{v}.{type_name}")
        except RuntimeError:
            continue
        found.append(f"opset{v}.{type_name}")
    if not found:
        raise ValueError(f"no opset defines an op named {type_name!r}")
    return tuple(found)


def _named(node: Pattern, name: str | None) -> Pattern:
    if name:
        node.set_friendly_name(_NAME_PREFIX + name)
    return node


def op(
    type_names: str | tuple[str, ...],
    *inputs: Pattern,
    name: str | None = None,
    when: Callable[[ov.Output], bool] | None = None,
) -> Pattern:
    """A node of one of `type_names` ("MatMul" or ("Split", "VariadicSplit")) whose inputs match `inputs`
    (none given: any inputs) and, if given, for which `when(output)` holds."""
    types = [v for t in ((type_names,) if isinstance(type_names, str) else type_names) for v in versions(t)]
    args: list = [types]
    if inputs:
        args.append([i.output(0) if isinstance(i, ov.Node) else i for i in inputs])
    if when is not None:
        args.append(when)
    return _named(WrapType(*args), name)


def any_input(name: str | None = None) -> Pattern:
    return _named(AnyInput(), name)


def const(name: str | None = None) -> Pattern:
    return op("Constant", name=name)


def either(*alternatives: Pattern, name: str | None = None) -> Pattern:
    return _named(Or(list(alternatives)), name)


RESHAPES = LAYOUT  # the layout-only ops `reshaped` and `strip` look through


def reshaped(x: Pattern, times: int = 5) -> Pattern:
    """`x` behind up to `times` layout-only ops (Reshape/Squeeze/Unsqueeze/Convert/Broadcast), greedily:
    `x` binds to the value before the longest such chain."""
    types = [v for t in RESHAPES for v in versions(t)]
    for _ in range(times):
        x = Or([WrapType(types, [x.output(0), AnyInput().output(0)]), WrapType(types, [x.output(0)]), x])
    return x


def match(pattern: Pattern, output: ov.Output) -> dict[str, ov.Output] | None:
    """Match `pattern` at `output`; the named nodes' values, or None. Untaken `either` branches are absent."""
    matcher = Matcher(pattern, "moe_fusion")
    if not matcher.match(output):
        return None
    values = {}
    for pattern_node, value in matcher.get_pattern_value_map().items():
        label = pattern_node.get_friendly_name()
        if label.startswith(_NAME_PREFIX):
            values[label[len(_NAME_PREFIX) :]] = value
    return values


def matches(model: ov.Model, pattern: Pattern, anchor: str) -> Iterator[dict[str, ov.Output]]:
    """`match(pattern, ...)` at every node of type `anchor` (the pattern's root) that matches."""
    for node in model.get_ordered_ops():
        if node.get_type_name() == anchor:
            values = match(pattern, node.output(0))
            if values is not None:
                yield values


# ---- building blocks shared by families -----------------------------------------------------------


def weight(name: str) -> Pattern:
    """A weight as exporters store it: a Constant, optionally behind a decompression subgraph (f16 Convert,
    NNCF int8/int4 scales and zero points)."""
    return _named(AnyInput(is_weight), name)


def linear(x: Pattern, name: str) -> Pattern:
    """`nn.Linear` without bias: MatMul(x, W) with W `[out, in]` (transpose_b) or `[in, out]`."""
    return op("MatMul", x, weight(name), name=name + "_matmul")


def swish(x: Pattern) -> Pattern:
    """SiLU/Swish as exporters leave it: Swish (1 or 2 inputs) or x * Sigmoid(x)."""
    return either(
        op("Swish", x, name="swish"),
        op("Swish", x, const("swish_beta"), name="swish"),
        op("Multiply", x, op("Sigmoid", x), name="swish"),
    )


def swish_beta(values: dict[str, ov.Output]) -> float:
    """The beta of a matched `swish(...)`: its second input, or 1 (SiLU)."""
    return float(values["swish_beta"].get_node().get_data()) if "swish_beta" in values else 1.0


def swiglu_mlp(x: Pattern) -> Pattern:
    """The expert MLP: down(act(gate(x)) * up(x))."""
    return linear(op("Multiply", swish(linear(x, "gate")), linear(x, "up")), "down")


# ---- reading matched values -------------------------------------------------------------------------


def unsliced(value: ov.Output, like: ov.Output) -> ov.Output:
    """`src[0:n, 0:m]` with `n, m = like.shape` (how torch's `scatter(dim, index, src)` reads `src`, index
    as `like`) is `src` itself when `src` has `like`'s rank and static dims: then `src`, else `value`."""
    node = value.get_node()
    if node.get_type_name() != "Slice":
        return value
    src, stop = strip(node.input_value(0)), strip(node.input_value(2)).get_node()
    start, step = (strip(node.input_value(i)).get_node() for i in (1, 3))
    if not (
        stop.get_type_name() == "ShapeOf"
        and same(strip(stop.input_value(0)), strip(like))
        and all(b.get_type_name() == "Constant" for b in (start, step))
        and not np.asarray(start.get_data()).any()
        and (np.asarray(step.get_data()) == 1).all()
    ):
        return value
    have, want = src.get_partial_shape(), like.get_partial_shape()
    if have.rank != want.rank or any(a.is_static and b.is_static and a != b for a, b in zip(have, want, strict=True)):
        return value
    return src


def read_linear(values: dict[str, ov.Output], name: str) -> tuple[np.ndarray | Compressed, ov.Type | None]:
    """The weight of a matched `linear(x, name)` as `[in, out]` (stacked: `[E, in, out]`) plus the type of
    its decompression Convert (None if the Constant feeds the MatMul directly). Weights behind an integer
    decompression come back as `Compressed`, never dequantised."""
    matmul = values[name + "_matmul"].get_node()
    attrs = matmul.get_attributes()
    if attrs["transpose_a"]:
        raise ValueError(f"{name} MatMul transposes its activation input")
    source = matmul.input_value(1)
    if not is_plain(source):
        return Compressed(source, attrs["transpose_b"]), None
    convert_to = None
    if source.get_node().get_type_name() == "Convert":
        convert_to = source.get_element_type()
        source = source.get_node().input_value(0)
    data = source.get_node().get_data()
    return (np.swapaxes(data, -1, -2) if attrs["transpose_b"] else data), convert_to
