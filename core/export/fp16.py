"""fp16 conversion of an ONNX graph that keeps the numerically fragile ops in fp32 (onnx + numpy only).

Rules, node by node in topological order:

- *fragile* ops (:data:`FP32_OPS`: softmax, layer/group/instance normalisation, reductions, ``Pow``/``Sqrt``/
  ``Reciprocal``/``Exp``/``Log``, ``Sin``/``Cos`` of timestep embeddings, ``Range``) run in fp32: softmax of fp16
  logits and variance sums overflow or lose the small terms (Micikevicius et al. 2018, "Mixed Precision Training",
  sec. 3.3 keeps reductions in fp32 for the same reason); ``sin(t * f)`` with ``t ~ 1000`` needs more than fp16's
  11-bit mantissa;
- *heavy* ops (:data:`FP16_OPS`: MatMul, Gemm, Conv, Einsum) run in fp16 — that is where the time goes;
- every other op *follows* its float inputs: fp16 if any is fp16 or if all are weights (an embedding ``Gather``),
  else fp32. An fp32 chain (timestep embedding, an RMSNorm's ``x^2 -> mean -> + eps -> sqrt``) therefore stays
  fp32 until it meets the fp16 stream;
- the model's own ``Cast(to=FLOAT)`` is honoured (diffusers upcasts on purpose), weights are stored once per
  precision that uses them, graph inputs and outputs stay float32 (``keep_io_types``) so a runtime never changes.

``onnxruntime.transformers.float16`` does the same job but appends its casts out of topological order (the ONNX
checker rejects the result) and has no "follow" rule; this pass is ~150 lines and checked by strict shape
inference.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from . import metadata as md
from .metadata import OnnxModelError

FP32_OPS = frozenset({
    "Softmax", "LogSoftmax", "LayerNormalization", "GroupNormalization", "InstanceNormalization",
    "BatchNormalization", "RMSNormalization", "SimplifiedLayerNormalization", "SkipLayerNormalization",
    "ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL2", "ReduceLogSumExp", "ReduceProd",
    "Pow", "Sqrt", "Reciprocal", "Exp", "Log", "Sin", "Cos", "Range", "CumSum",
    "RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "TopK", "NonMaxSuppression",
})
FP16_OPS = frozenset({"MatMul", "Gemm", "Conv", "ConvTranspose", "Einsum", "Attention", "MultiHeadAttention"})
#: (op, input index) pairs that the ONNX spec types as float32 whatever the data type
_KEEP_FP32_INPUTS = {"Resize": {1, 2}, "Upsample": {1}}
#: ops that accept any type and produce no float: no cast is inserted in front of them
_TYPE_AGNOSTIC = frozenset({"Shape", "Size"})

FP16_MAX = 65504.0
FP16_MIN_POSITIVE = 5.96e-08


def _has_subgraph(node: onnx.NodeProto) -> bool:
    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)


def _value_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every value (graph inputs, initializers, value_info, outputs; shape inference fills gaps
    on a weight-less skeleton so a > 2 GB model is never serialised)."""
    g = model.graph
    types = {t.name: t.data_type for t in g.initializer}
    for v in list(g.input) + list(g.value_info) + list(g.output):
        if v.type.HasField("tensor_type") and v.type.tensor_type.elem_type:
            types[v.name] = v.type.tensor_type.elem_type
    for n in g.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    types[n.output[0]] = a.t.data_type
    missing = [o for n in g.node for o in n.output if o and o not in types]
    if missing:
        skeleton = onnx.ModelProto()
        skeleton.CopyFrom(model)
        sg = skeleton.graph
        del sg.initializer[:]
        for t in g.initializer:
            sg.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
        inferred = onnx.shape_inference.infer_shapes(skeleton)
        for v in list(inferred.graph.value_info) + list(inferred.graph.output):
            if v.type.tensor_type.elem_type:
                types.setdefault(v.name, v.type.tensor_type.elem_type)
        still = [o for o in missing if o not in types]
        if still:
            raise ValueError(f"fp16 conversion: cannot infer the type of {len(still)} values (e.g. {still[:3]})")
    return types


def convert_to_fp16(model: onnx.ModelProto, fp32_ops: frozenset[str] | set[str] = FP32_OPS,
                    check: bool = True) -> onnx.ModelProto:
    """Return an fp16 copy of ``model`` with fp32 inputs/outputs and the fragile ops in fp32 (rules above).

    Args:
        model: a float32 ONNX model without control flow (If/Loop/Scan), as the torch.export-based exporter
            writes for diffusion networks.
        fp32_ops: op types kept in fp32 (default :data:`FP32_OPS`).
        check: run strict shape inference on the result (type errors surface here, not at session creation).
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    if any(_has_subgraph(n) for n in g.node):
        raise NotImplementedError("fp16 conversion does not handle control flow (If/Loop/Scan); export in fp32")
    types = _value_types(out)
    F, H = TensorProto.FLOAT, TensorProto.FLOAT16

    # Constant nodes holding float32 tensors become initializers (so they are "flexible" like weights)
    consts = []
    for n in g.node:
        if n.op_type == "Constant" and len(n.attribute) == 1 and n.attribute[0].name == "value" \
                and n.attribute[0].t.data_type == F:
            t = onnx.TensorProto()
            t.CopyFrom(n.attribute[0].t)
            t.name = n.output[0]
            consts.append(t)
    const_names = {t.name for t in consts}
    nodes = [n for n in g.node if not (n.op_type == "Constant" and n.output[0] in const_names)]
    inits = {t.name: t for t in list(g.initializer) + consts}

    prec: dict[str, str] = {}  # value -> "fp32" | "fp16" | "flex" (float32 weight usable in both)
    for v in g.input:
        if types.get(v.name) == F:
            prec[v.name] = "fp32"
        elif types.get(v.name) == H:
            prec[v.name] = "fp16"
    for name, t in inits.items():
        if t.data_type == F:
            prec[name] = "flex"

    new_nodes: list[onnx.NodeProto] = []
    casts: dict[tuple[str, str], str] = {}
    fp16_inits: dict[str, onnx.TensorProto] = {}
    used_fp32: set[str] = set()

    def as_prec(name: str, p: str) -> str:
        cur = prec.get(name)
        if cur is None:
            return name
        if cur == "flex":
            if p == "fp32":
                used_fp32.add(name)
                return name
            if name not in fp16_inits:
                arr = numpy_helper.to_array(inits[name]).astype(np.float32)
                tiny = (arr != 0) & (np.abs(arr) < FP16_MIN_POSITIVE)
                arr = np.where(tiny, np.sign(arr) * FP16_MIN_POSITIVE, np.clip(arr, -FP16_MAX, FP16_MAX))
                fp16_inits[name] = numpy_helper.from_array(arr.astype(np.float16), f"{name}__fp16")
            return f"{name}__fp16"
        if cur == p:
            return name
        key = (name, p)
        if key not in casts:
            casts[key] = f"{name}__to_{p}"
            new_nodes.append(helper.make_node("Cast", [name], [casts[key]], to=H if p == "fp16" else F,
                                              name=f"fewstep_cast_{len(casts)}"))
            prec[casts[key]] = p
        return casts[key]

    for node in nodes:
        op = node.op_type
        float_in = [i for i, n in enumerate(node.input) if n and n in prec]
        if op in _TYPE_AGNOSTIC or op == "Cast":
            for i in float_in:
                if prec[node.input[i]] == "flex":
                    used_fp32.add(node.input[i])
            if op == "Cast":
                to = next(a.i for a in node.attribute if a.name == "to")
                if to in (F, H):
                    prec[node.output[0]] = "fp32" if to == F else "fp16"
            new_nodes.append(node)
            continue
        keep = _KEEP_FP32_INPUTS.get(op, set())
        if op in fp32_ops:
            p = "fp32"
        elif op in FP16_OPS:
            p = "fp16"
        else:
            seen = {prec[node.input[i]] for i in float_in if i not in keep}
            p = "fp32" if "fp32" in seen and "fp16" not in seen else "fp16"  # weights alone (a Gather): fp16
        for i in float_in:
            node.input[i] = as_prec(node.input[i], "fp32" if i in keep else p)
        for o in node.output:
            if types.get(o) == F:
                prec[o] = p
            elif types.get(o) == H:
                prec[o] = "fp16"
        new_nodes.append(node)

    for v in g.output:  # keep float32 outputs: rename the fp16 producer, cast back under the original name
        if prec.get(v.name) != "fp16":
            continue
        raw = f"{v.name}__fp16"
        for n in new_nodes:
            for k, name in enumerate(n.input):
                if name == v.name:
                    n.input[k] = raw
            for k, name in enumerate(n.output):
                if name == v.name:
                    n.output[k] = raw
        new_nodes.append(helper.make_node("Cast", [raw], [v.name], to=F, name=f"fewstep_cast_out_{v.name}"))

    keep_inits = [t for name, t in inits.items() if prec.get(name) != "flex" or name in used_fp32]
    del g.initializer[:]
    g.initializer.extend(keep_inits + list(fp16_inits.values()))
    del g.node[:]
    g.node.extend(new_nodes)
    del g.value_info[:]
    if check and sum(t.ByteSize() for t in g.initializer) < 1_800_000_000:  # larger: checked by path after saving
        out = onnx.shape_inference.infer_shapes(out, strict_mode=True, data_prop=False)
    return out


def read_onnx_metadata(path: str | Path) -> dict:
    """The fewstep metadata of an ONNX file, read with ``onnx`` (weights not loaded)."""
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - protobuf decode errors have several types
        raise OnnxModelError(f"cannot read {path}: not a valid ONNX file ({type(e).__name__})") from None
    props = {p.key: p.value for p in model.metadata_props}
    return md.parse(props.get(md.METADATA_KEY), str(path))


def convert_file_to_fp16(src: str | Path, dst: str | Path, external_data: bool | None = None) -> dict:
    """fp16 copy of a fewstep fp32 export (metadata updated to ``precision: fp16``); returns the metadata."""
    meta = read_onnx_metadata(src)
    if meta.get("precision") == "fp16":
        raise ValueError(f"{src} is already fp16")
    model = onnx.load(str(src))
    out = convert_to_fp16(model)
    meta["precision"] = "fp16"
    del out.metadata_props[:]
    helper.set_model_props(out, {md.METADATA_KEY: md.dumps(meta)})
    dst = Path(dst)
    size = sum(t.ByteSize() for t in out.graph.initializer)
    external = size > 1_800_000_000 if external_data is None else bool(external_data)
    from ..io import atomic_file_set as atomic_onnx_path

    with atomic_onnx_path(dst) as tmp:
        onnx.save_model(out, str(tmp), save_as_external_data=external, all_tensors_to_one_file=True,
                        location=tmp.name + ".data", size_threshold=1024)
        onnx.checker.check_model(str(tmp), full_check=True)
    return meta
