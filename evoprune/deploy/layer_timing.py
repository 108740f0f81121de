"""One conv or linear layer of a model, timed on its own on a deployment runtime: the cells of a latency table.

:func:`layer_spec` reads what to rebuild from the model (the module's hyper-parameters and its input shape at the
latency batch), :func:`time_layer` builds that layer alone at given input/output widths, as a one-node ONNX model
or a torch module, and times it with :func:`evoprune.deploy.runtime.time_call`; :func:`spec_key` names the cell in
the table's cache.
"""
from __future__ import annotations

import json

import numpy as np
import torch
import torch.nn as nn

from .runtime import runner, time_call


def layer_spec(model: nn.Module, call, base: np.ndarray, batch: int) -> dict | None:
    """What to build to time ``call`` alone: the module's hyper-parameters and its input shape at ``batch``."""
    if call.kind not in ("conv", "linear"):
        return None
    module = model.get_submodule(call.module)
    ins = [int(v) for v in base[call.in_dims]]
    if not ins:
        return None
    ins[0] = batch
    spec = {"kind": call.kind, "in_shape": ins, "bias": module.bias is not None}
    if call.kind == "conv":
        if not isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            return None
        spec.update(kernel=list(module.kernel_size), stride=list(module.stride), dilation=list(module.dilation),
                    padding=module.padding if isinstance(module.padding, str) else list(module.padding),
                    groups=module.groups, depthwise=bool(call.attrs.get("depthwise")))
    elif not isinstance(module, nn.Linear):
        return None
    return spec


def spec_key(spec: dict, cin: int, cout: int) -> str:
    """The cache key of one cell: the layer and its widths."""
    return json.dumps([spec, cin, cout], sort_keys=True, separators=(",", ":"))


def _onnx_layer(spec: dict, cin: int, cout: int) -> bytes:
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(0)
    shape = list(spec["in_shape"])
    inits = []
    if spec["kind"] == "conv":
        shape[1] = cin
        groups = cin if spec["depthwise"] else spec["groups"]
        w = rng.standard_normal((cout, cin // groups, *spec["kernel"])).astype(np.float32)
        inits.append(numpy_helper.from_array(w, "w"))
        inputs = ["x", "w"]
        if spec["bias"]:
            inits.append(numpy_helper.from_array(np.zeros(cout, np.float32), "b"))
            inputs.append("b")
        attrs = dict(kernel_shape=spec["kernel"], strides=spec["stride"], dilations=spec["dilation"], group=groups)
        if isinstance(spec["padding"], str):
            attrs["auto_pad"] = "SAME_UPPER" if spec["padding"] == "same" else "VALID"
        else:
            attrs["pads"] = list(spec["padding"]) * 2
        nodes = [helper.make_node("Conv", inputs, ["y"], **attrs)]
    else:
        shape[-1] = cin
        inits.append(numpy_helper.from_array(rng.standard_normal((cin, cout)).astype(np.float32), "w"))
        nodes = [helper.make_node("MatMul", ["x", "w"], ["y" if not spec["bias"] else "m"])]
        if spec["bias"]:
            inits.append(numpy_helper.from_array(np.zeros(cout, np.float32), "b"))
            nodes.append(helper.make_node("Add", ["m", "b"], ["y"]))
    graph = helper.make_graph(nodes, "layer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m.SerializeToString()


def _torch_layer(spec: dict, cin: int, cout: int) -> nn.Module:
    if spec["kind"] == "linear":
        return nn.Linear(cin, cout, bias=spec["bias"])
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[len(spec["kernel"])]
    groups = cin if spec["depthwise"] else spec["groups"]
    padding = spec["padding"] if isinstance(spec["padding"], str) else tuple(spec["padding"])
    return conv(cin, cout, tuple(spec["kernel"]), stride=tuple(spec["stride"]), padding=padding,
                dilation=tuple(spec["dilation"]), groups=groups, bias=spec["bias"])


def time_layer(spec: dict, cin: int, cout: int, runtime: str, threads: int, repeats: int) -> float:
    """Median milliseconds of the layer of ``spec`` alone at ``cin -> cout`` channels on ``runtime``."""
    shape = list(spec["in_shape"])
    shape[1 if spec["kind"] == "conv" else -1] = cin
    x = torch.randn(*shape)
    if runtime == "onnxruntime":
        run = runner(runtime, None, x, threads, onnx=_onnx_layer(spec, cin, cout))
    else:
        run = runner(runtime, _torch_layer(spec, cin, cout), x, threads)
    return time_call(run, warmup=2, repeats=repeats, sample_ms=1.0, warmup_s=0.02,
                     what=f"a {spec['kind']} {cin}->{cout}").median_ms
