"""Facts about a model read from its graph: the coarsest weight storage type, whether it keeps state,
its vocabulary size, and the bytes its weights are stored in."""

from __future__ import annotations

import numpy as np
import openvino as ov

from moe_fusion.graph import constant_behind, output_name

_LOW_BIT = {"i4": "int4", "u4": "int4", "nf4": "int4", "f4e2m1": "int4", "i8": "int8", "u8": "int8"}


_RANK = ["f32", "bf16", "f16", "int8", "int4"]  # later = coarser


def weight_type(model: ov.Model) -> str:
    """The coarsest storage type among the model's weights (Constants of >= 1024 elements)."""
    found = "f32"
    for node in model.get_ordered_ops():
        if node.get_type_name() != "Constant" or int(np.prod(list(node.get_output_shape(0)))) < 1024:
            continue
        name = node.get_output_element_type(0).get_type_name()
        kind = _LOW_BIT.get(name, name if name in ("f16", "bf16") else "f32")
        if _RANK.index(kind) > _RANK.index(found):
            found = kind
    return found


def is_stateful(model: ov.Model) -> bool:
    return bool(model.get_sinks()) or any(n.get_type_name() == "ReadValue" for n in model.get_ordered_ops())


def vocab_size(model: ov.Model) -> int | None:
    """Rows of the embedding table `input_ids` indexes (Gather on a Constant, maybe decompressed)."""
    ids = next((p for p in model.get_parameters() if output_name(p.output(0)) == "input_ids"), None)
    if ids is None:
        return None
    stack, seen = [ids.output(0)], set()
    while stack:
        value = stack.pop()
        for target in value.get_target_inputs():
            node = target.get_node()
            if node.get_instance_id() in seen:
                continue
            seen.add(node.get_instance_id())
            kind = node.get_type_name()
            if kind == "Gather" and target.get_index() == 1:
                table = constant_behind(node.input_value(0))
                if table is not None and len(table.get_output_shape(0)) >= 1:
                    return int(table.get_output_shape(0)[0])
            elif kind in ("Convert", "Reshape", "Squeeze", "Unsqueeze"):
                stack.append(node.output(0))
    for result in model.outputs:  # no embedding found: the logits' width
        if "logits" in result.get_names() and result.get_partial_shape()[-1].is_static:
            return result.get_partial_shape()[-1].get_length()
    return None


def stored_bytes(model: ov.Model) -> int:
    """Bytes of the model's Constants as stored (what its .bin holds)."""
    return sum(n.get_byte_size() for n in model.get_ordered_ops() if n.get_type_name() == "Constant")

