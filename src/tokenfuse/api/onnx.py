"""Export a text encoder, reduced in static mode or unreduced, to ONNX, to serve it on ONNX Runtime
without PyTorch. Needs the `onnx` extra (onnxscript for the exporter, onnxruntime for the check).

The default mode reads token counts back from the tensors at every reduction point, which
`torch.export` cannot trace ("could not guard on data-dependent expression"); static mode
(`static=True`) reads nothing back, so the whole reduced forward exports as one graph. One operator
needs a translation of its own: the stable sort that ranks tokens, which becomes ONNX's TopK, stable
by its specification (equal values keep their index order).
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from .patching import patch_of
from .text import sizes_and_trace

#: what the exported graph gives, in order
OUTPUTS = ("last_hidden_state", "token_sizes", "layer_tokens")


class _Exported(nn.Module):
    """An encoder as the exporter takes it: ids and mask in; out, the last hidden states (B, N', C),
    how many input tokens each stands for (B, N'; 0 marks padding: pool by it, `tokenfuse.pool_mean`)
    and the tokens each layer processed (L, 2, B: entering its attention and its MLP)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask)[0]
        size, layer_tokens = sizes_and_trace(self.model, attention_mask)
        return hidden, size.float(), layer_tokens


def export_onnx(model: nn.Module, path: str | Path, attention: str = "eager") -> Path:
    """Write `model`, a Hugging Face text encoder, unreduced or reduced in static mode, to `path` as
    ONNX: inputs input_ids and attention_mask (batch, tokens), any batch size and length; outputs
    `OUTPUTS`. The graph is run on ONNX Runtime on a padded example and compared with the model
    before this returns.

    attention: the attention implementation exported ("eager" or "sdpa"); ONNX Runtime ran the
    eager graph of MiniLM about 1.4x faster than the sdpa one (64 BBC documents, 2 cores).
    """
    path = Path(path)
    missing = [m for m in ("onnxscript", "onnxruntime") if importlib.util.find_spec(m) is None]
    if missing:
        raise ValueError(f"exporting to ONNX needs {' and '.join(missing)}: pip install 'tokenfuse[onnx]'")
    if not path.parent.is_dir():
        raise ValueError(f"the folder of {path} does not exist; create it first")
    if attention not in ("eager", "sdpa"):
        raise ValueError(f"attention must be 'eager' or 'sdpa', got {attention!r}")
    patch = patch_of(model)
    if patch is not None and not getattr(patch.method, "static", False):
        raise ValueError(
            "this model is reduced in the default mode, which reads token counts back from the tensors and "
            "cannot be exported: apply the method with static=True (the same reduction, laid out at widths "
            "known in advance)"
        )
    if getattr(model.config, "max_position_embeddings", None) is None:
        raise ValueError(f"{type(model).__name__} is not a Hugging Face text encoder")
    exported = copy.deepcopy(model)
    exported.set_attn_implementation(attention)
    ids = torch.full((2, 12), 1000)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    _export(_Exported(exported).eval(), ids, mask, path, model.config.max_position_embeddings)
    _check(path, _Exported(model).eval(), ids, mask)
    return path


def _sort_stable(self, stable=None, dim: int = -1, descending: bool = False):
    """aten.sort(stable=True) as ONNX TopK over the whole axis (stable by ONNX's specification)."""
    from onnxscript import opset18 as op

    k = op.Shape(self, start=dim) if dim == -1 else op.Shape(self, start=dim, end=dim + 1)
    return op.TopK(self, k, axis=dim, largest=1 if descending else 0, sorted=1)


def _export(module: nn.Module, ids: Tensor, mask: Tensor, path: Path, max_tokens: int) -> None:
    """torch's warnings and log lines on the way are its own (deprecations, operators of packages
    not installed), not the caller's: the export is checked instead."""
    from torch.export import Dim

    axes = {0: Dim("batch"), 1: Dim("tokens", max=max_tokens)}
    log = logging.getLogger("torch.onnx")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                (ids, mask),
                str(path),
                input_names=["input_ids", "attention_mask"],
                output_names=list(OUTPUTS),
                dynamic_shapes=(axes, axes),
                dynamo=True,
                external_data=False,
                verbose=False,
                custom_translation_table={torch.ops.aten.sort.stable: _sort_stable},
            )
    finally:
        log.setLevel(level)


def _check(path: Path, module: nn.Module, ids: Tensor, mask: Tensor) -> None:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
    with torch.inference_mode():
        expected = module(ids, mask)
    sizes = expected[1]
    error = float((torch.from_numpy(got[0]) - expected[0])[sizes > 0].abs().max())
    if error > 1e-3 or not torch.equal(torch.from_numpy(got[1]), sizes):
        path.unlink()
        raise ValueError(f"the ONNX export of {type(module.model).__name__} differs from it by {error:.2g}")
