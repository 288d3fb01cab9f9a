#!/usr/bin/env python
"""Sanity-check the exported MoE fixtures: op counts, MoE structure, one CPU run (f32).

    python models/check_fixtures.py [--fixtures models/fixtures] [--compare] [--json out.json] [names...]
    python models/check_fixtures.py --walk 0 gen1-mixtral     # print layer 0's MoE op chain

For each fixture: read with openvino, count ops by type, find the routers and the expert MatMuls per
layer (per-expert loop: one MatMul per expert and projection; tiled: MatMuls on stacked [E, ..] weights),
compile on CPU with INFERENCE_PRECISION_HINT=f32 and run a prefill plus one decode step.
--compare rebuilds the source Hugging Face model with export_hf.py (same seed, same init) when the
fixture belongs to the running exporter generation and compares logits with the IR's.
Prints a markdown table.
"""
import argparse
import json
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import openvino as ov

ROUTER = re.compile(r"\.(gate|router(\.layer)?)/aten::linear/MatMul")
LAYER = re.compile(r"layers\.(\d+)\.")
EXPERT = re.compile(r"experts\.(\d+)\.")
INTERESTING = ["MatMul", "NonZero", "OneHot", "Tile", "ScatterElementsUpdate", "ScatterNDUpdate", "TopK",
               "Softmax", "Sigmoid", "Swish", "ReduceSum", "Slice", "StridedSlice", "Concat", "Gather",
               "Clamp", "Minimum"]


def source_const(v):
    """Follow a MatMul input back through Convert/Reshape/Transpose to a Constant (or None)."""
    node = v.get_node()
    while node.get_type_name() in ("Convert", "Reshape", "Transpose", "Unsqueeze"):
        node = node.input_value(0).get_node()
    return node if node.get_type_name() == "Constant" else None


def layer_of(node, max_steps=400):
    """Layer index from the friendly name, or from the nearest named consumer (conversion-time passes
    such as FuseMOE give new nodes auto names)."""
    m = LAYER.search(node.get_friendly_name())
    if m:
        return int(m.group(1))
    seen, frontier = set(), [node]
    while frontier and len(seen) < max_steps:
        nxt = []
        for n in frontier:
            for out in n.outputs():
                for t in out.get_target_inputs():
                    c = t.get_node()
                    if c.get_friendly_name() in seen:
                        continue
                    seen.add(c.get_friendly_name())
                    m = LAYER.search(c.get_friendly_name())
                    if m:
                        return int(m.group(1))
                    nxt.append(c)
        frontier = nxt
    return -1


def analyse(model):
    ops = model.get_ordered_ops()
    counts = Counter(op.get_type_name() for op in ops)
    routers = [op for op in ops if op.get_type_name() == "MatMul" and ROUTER.search(op.get_friendly_name())]
    n_experts = max((int(source_const(r.input_value(1)).get_output_shape(0)[0]) for r in routers
                     if source_const(r.input_value(1))), default=0)
    per_layer = defaultdict(lambda: {"matmuls": 0, "experts": set(), "stacked": False})
    for op in ops:
        if op.get_type_name() != "MatMul" or ROUTER.search(op.get_friendly_name()):
            continue
        name = op.get_friendly_name()
        if "shared_expert" in name:
            continue
        w = source_const(op.input_value(1))
        if w is None:
            continue
        shape = list(w.get_output_shape(0))
        entry = None
        if len(shape) == 3 and shape[0] == n_experts:                 # stacked [E, ., .] weights
            entry = per_layer[layer_of(op)]
            entry["experts"].update(range(shape[0]))
            entry["stacked"] = True
        elif EXPERT.search(name):                                       # per-expert loop, named by module
            entry = per_layer[layer_of(op)]
            entry["experts"].add(int(EXPERT.search(name).group(1)))
        elif re.search(r"(input|output)_linear/aten::linear/MatMul(_\d+)?$", name):  # GraniteMoE slices
            entry = per_layer[layer_of(op)]
            m = re.search(r"MatMul_(\d+)$", name)
            entry["experts"].add(int(m.group(1)) if m else 0)
        if entry is not None:
            entry["matmuls"] += 1
    layers = {k: {"matmuls": v["matmuls"], "experts": len(v["experts"]), "stacked": v["stacked"]}
              for k, v in sorted(per_layer.items())}
    # k of the TopK ops that select experts: input [tokens, E]
    ks = sorted({int(op.input_value(1).get_node().get_data()) for op in ops
                 if op.get_type_name() == "TopK" and op.input_value(1).get_node().get_type_name() == "Constant"
                 and op.get_input_partial_shape(0).rank.get_length() == 2
                 and op.get_input_partial_shape(0)[1].is_static
                 and op.get_input_partial_shape(0)[1].get_length() == n_experts})
    any_stacked = any(v["stacked"] for v in layers.values())
    if any_stacked:
        form = "tiled" if counts["Tile"] else "batched (no Tile)"
    elif any(v["matmuls"] for v in layers.values()) and counts["NonZero"]:
        form = "per-expert loop"
    elif any(v["matmuls"] for v in layers.values()):
        form = "sort-and-slice" if counts["Slice"] + counts["StridedSlice"] else "other"
    else:
        form = "no experts found"
    return {"counts": counts, "routers": len(routers), "n_experts": n_experts, "layers": layers,
            "topk_k": ks, "form": form}


def versions(model):
    out = {}
    for key in ("optimum_intel_version", "transformers_version"):
        if model.has_rt_info(["optimum", key]):
            out[key] = model.get_rt_info(["optimum", key]).astype(str)
    return out


def run(core, model, path, compare):
    cm = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    # did the CPU plugin's own MoE passes turn the experts into GatherMatmul (its fused MoE kernel)?
    gmm = sum(op.get_rt_info()["layerType"].astype(str) == "GatherMatmul"
              for op in cm.get_runtime_model().get_ordered_ops())
    names = {i.any_name for i in model.inputs}
    rng = np.random.default_rng(0)
    if "input_ids" not in names:                                        # a bare MoE block
        x = rng.standard_normal((1, 8, model.inputs[0].get_partial_shape()[2].get_length())).astype(np.float32)
        y = cm({0: x})[0]
        ref = compare(x) if compare else None
        return {"out_shape": list(y.shape), "finite": bool(np.isfinite(y).all()), "cpu_gather_matmul": gmm,
                "max_abs_diff": None if ref is None else float(np.abs(ref - y).max())}
    cfg = json.loads((path / "config.json").read_text())
    ids = rng.integers(0, cfg["vocab_size"], (1, 12))
    req = cm.create_infer_request()
    req.reset_state()
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(12)[None],
            "beam_idx": np.zeros(1, np.int32)}
    logits = req.infer(feed)[0].copy()
    nxt = np.array([[int(logits[0, -1].argmax())]])
    dec = req.infer({"input_ids": nxt, "attention_mask": np.ones((1, 13), np.int64),
                     "position_ids": np.array([[12]]), "beam_idx": np.zeros(1, np.int32)})[0].copy()
    res = {"cpu_gather_matmul": gmm, "out_shape": list(logits.shape),
           "finite": bool(np.isfinite(logits).all() and np.isfinite(dec).all())}
    if compare:
        ref, ref_dec = compare(ids, nxt)
        res["max_abs_diff"] = float(max(np.abs(ref - logits).max(), np.abs(ref_dec - dec[:, -1:]).max()))
        res["logit_scale"] = float(np.abs(ref).max())
    return res


def comparer(name):
    """Rebuild the HF source of a fixture of the running generation (None if not possible)."""
    sys.path.insert(0, str(Path(__file__).parent))
    import export_hf as E
    import torch

    if name == "convert-olmoe-block" and E.GEN == "gen1":
        _, block = E.build_olmoe_block()
        return lambda x: block(torch.from_numpy(x))[0].detach().numpy()
    gen, _, spec_name = name.partition("-")
    if gen != E.GEN or spec_name not in E.SPECS:
        return None
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        model = E.build(spec_name, E.SPECS[spec_name], tmp)

    @torch.no_grad()
    def ref(ids, nxt):
        out = model(torch.from_numpy(ids), use_cache=True)
        dec = model(torch.from_numpy(nxt), past_key_values=out.past_key_values, use_cache=True)
        return out.logits.numpy(), dec.logits.numpy()
    return ref


def walk(model, layer):
    """Print the ops from the router's input (the flattened hidden states) to the residual Add of one MoE
    layer, in topological order, with input references, output types/shapes and key attributes."""
    ops = model.get_ordered_ops()
    pat = re.compile(rf"layers\.{layer}\.[a-z_]+\.(gate|router(\.layer)?)/aten::linear/MatMul$")
    router = next(op for op in ops if op.get_type_name() == "MatMul" and pat.search(op.get_friendly_name()))
    src = router.input_value(0).get_node()
    keep, stack = {src.get_friendly_name()}, [src]
    while stack:                                   # forward closure, stopping at this layer's residual Add
        for out in stack.pop().outputs():
            for t in out.get_target_inputs():
                c, k = t.get_node(), t.get_node().get_friendly_name()
                m = LAYER.search(k.replace("/", "."))
                if k in keep or (m and int(m.group(1)) > layer):
                    continue
                keep.add(k)
                if not re.search(rf"layers\.{layer}/aten::add/Add", k):
                    stack.append(c)
    sel = [op for op in ops if op.get_friendly_name() in keep]
    num = {op.get_friendly_name(): i for i, op in enumerate(sel)}

    def ref(v):
        n = v.get_node()
        if n.get_friendly_name() in num:
            return f"%{num[n.get_friendly_name()]}" + (f".{v.get_index()}" if n.get_output_size() > 1 else "")
        if n.get_type_name() == "Constant":
            shape = list(n.get_output_shape(0))
            if int(np.prod(shape)) <= 4:
                return f"C{n.get_data().ravel().tolist()}"
            return f"C<{n.get_output_element_type(0).get_type_name()}{shape}>"
        return f"<{n.get_type_name()}>"
    attrs = ("transpose_a", "transpose_b", "axis", "mode", "sort", "reduction", "keep_dims", "destination_type")
    for i, op in enumerate(sel):
        a = {k: v for k, v in op.get_attributes().items() if k in attrs}
        outs = " ".join(f"{o.get_element_type().get_type_name()}{o.get_partial_shape()}" for o in op.outputs())
        args = ", ".join(ref(op.input_value(j)) for j in range(op.get_input_size()))
        name = op.get_friendly_name().replace("__module.model.", "")
        print(f"%{i} {op.get_type_name()}({args}) -> {outs} {a if a else ''}  # {name}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--fixtures", default=str(Path(__file__).parent / "fixtures"))
    ap.add_argument("--compare", action="store_true", help="compare logits with the rebuilt HF model")
    ap.add_argument("--json")
    ap.add_argument("--walk", type=int, metavar="LAYER", help="print one MoE layer's op chain instead")
    ap.add_argument("names", nargs="*")
    args = ap.parse_args()
    core = ov.Core()
    root = Path(args.fixtures)
    dirs = [root / n for n in args.names] if args.names else sorted(p for p in root.iterdir() if p.is_dir())
    if args.walk is not None:
        for d in dirs:
            print(f"## {d.name} layer {args.walk}")
            walk(core.read_model(d / "openvino_model.xml"), args.walk)
        return
    results = {}
    print("| fixture | form | MB | routers | experts/layer (expert MatMuls) | top-k | key op counts "
          "| CPU GatherMatmul | run |")
    print("|---|---|---|---|---|---|---|---|---|")
    for d in dirs:
        model = core.read_model(d / "openvino_model.xml")
        a = analyse(model)
        try:
            r = run(core, model, d, comparer(d.name) if args.compare else None)
        except Exception as e:
            r = {"error": f"{type(e).__name__}: {e}"}
        size = sum(f.stat().st_size for f in d.iterdir()) / 2**20
        layers = ", ".join(f"{'L' + str(k) if k >= 0 else 'block'}: {v['experts']} ({v['matmuls']})"
                           for k, v in a["layers"].items())
        key = " ".join(f"{t}={a['counts'][t]}" for t in INTERESTING if a["counts"][t])
        status = r.get("error") or ("ok" if r["finite"] else "NaN") + (
            f", max|diff| {r['max_abs_diff']:.1e}" if r.get("max_abs_diff") is not None else "")
        print(f"| {d.name} | {a['form']} | {size:.2f} | {a['routers']} | {layers} | "
              f"{','.join(map(str, a['topk_k']))} | {key} | {r.get('cpu_gather_matmul', '-')} | {status} |")
        results[d.name] = {**a, "counts": dict(a["counts"]), "run": r, "size_mb": round(size, 3),
                           "versions": versions(model)}
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
