"""The traced model's past/present tensor pairs as OpenVINO states, in optimum-intel's layout.

- `beam_idx` (i32, `[batch]`): every past tensor is read through `Gather(past, beam_idx, axis 0)`, so a
  generation loop reorders the cache between steps (beam search) without touching the states.
- OpenVINO's own MakeStateful transformation turns each (past input, present output) pair into a
  ReadValue/Assign state (variable id: input name + output name, as in optimum-intel's exports).
- Each ReadValue gets a zero initialiser `[batch, heads, 0, width]` (batch from `input_ids`): a state
  without one fails CPU compilation, and an empty past is what a fresh sequence starts from.
"""

from __future__ import annotations

import numpy as np
import openvino as ov
import openvino.opset13 as ops
from openvino._offline_transformations import apply_make_stateful_transformation

BATCH_AXIS = 0


def make_stateful(model: ov.Model, past: list[str], present: list[str]) -> ov.Model:
    """Turn `past[i]` -> `present[i]` into states in place; add `beam_idx`. Returns `model`."""
    batch = model.input("input_ids").get_partial_shape()[0]
    beam_idx = ops.parameter(ov.PartialShape([batch]), ov.Type.i32, name="beam_idx")
    beam_idx.output(0).get_tensor().set_names({"beam_idx"})
    model.add_parameters([beam_idx])
    for name in past:
        port = model.input(name)
        consumers = list(port.get_target_inputs())
        gathered = ops.gather(port, beam_idx, ops.constant(np.int64(BATCH_AXIS)))
        for consumer in consumers:
            consumer.replace_source_output(gathered.output(0))
    model.validate_nodes_and_infer_types()
    apply_make_stateful_transformation(model, dict(zip(past, present, strict=True)))
    _zero_initialisers(model)
    return model


def _zero_initialisers(model: ov.Model) -> None:
    ids = model.input("input_ids")
    batch = ops.gather(ops.shape_of(ids, output_type="i64"), ops.constant(np.array([0], np.int64)),
                       ops.constant(np.int64(0)))
    for op in model.get_ops():
        if op.get_type_name() != "ReadValue":
            continue
        dims = []
        for axis, dim in enumerate(op.get_output_partial_shape(0)):
            if axis == BATCH_AXIS:
                dims.append(batch)
            else:  # static dims as they are; dynamic ones (the sequence) start empty
                dims.append(ops.constant(np.array([dim.get_length() if dim.is_static else 0], np.int64)))
        zeros = ops.broadcast(ops.constant(np.zeros((), op.get_output_element_type(0).to_dtype())),
                              ops.concat(dims, 0))
        op.set_arguments([zeros])
    model.validate_nodes_and_infer_types()
