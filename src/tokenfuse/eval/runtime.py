"""How a bench runs a model other than as eager PyTorch in float32: on another runtime (`RUNTIMES`:
torch.compile, int8, ONNX Runtime, a copy built once by `runtime_model`), or built with random
weights in a dtype (`random_model`, the speed benches)."""

from __future__ import annotations

import copy
import warnings
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..api import apply
from .ort import OnnxRuntimeModel

if TYPE_CHECKING:
    from .measure import Config

#: the dtypes the speed benches on random weights run in (`--dtype`)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def random_model(model_class: type, config: Any, dtype: str) -> nn.Module:
    """A speed bench's model: `model_class` built from `config` with random weights (transformers'
    own initialisation, seeded), in the dtype named (one of `DTYPES`)."""
    torch.manual_seed(0)
    return model_class._from_config(config, dtype=DTYPES[check_dtype(dtype)]).eval()


def check_dtype(dtype: str) -> str:
    """The `--dtype` of a speed bench, checked before any work."""
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: choose from {', '.join(DTYPES)}")
    return dtype


RUNTIMES = ("eager", "compile", "int8", "onnxruntime")  # how a bench runs a model
BUILT_FOR = "_tokenfuse_runtime"  # set on a `runtime_model`: the runtime it was built for
UNTIMED_HOOKS = ("compile", "onnxruntime")  # runtimes that run the hooks inside their graph, untimed


def runtime_model(model: nn.Module, config: Config, baseline: bool, **extra: Any) -> nn.Module:
    """A copy of `model` running `config` on its runtime, the reduction installed once (none for a
    baseline), for `run_pass` to time as it is. `extra`: apply's options.

    int8: every nn.Linear quantized by dynamic quantization (`torch.ao.quantization.quantize_dynamic`:
    int8 weights per output channel, activations quantized per batch as they come; per-tensor
    weights cost MiniLM 0.07 of embedding cosine, per-channel 0.02, at the same speed), then the
    reduction applied to the quantized model. compile: the reduction applied, then
    `torch.compile(dynamic=True)` of the whole model with its hooks; its first calls compile, so a
    task runs it once before timing it. In the default mode the hooks run outside the graphs, which
    they split at every hooked module (compiled once for every layer); in static mode the model is one
    graph. onnxruntime: the reduction applied (static mode only), the model exported to ONNX and run
    by ONNX Runtime (`ort.OnnxRuntimeModel`), which gives the hidden states and the token sizes.
    """
    if config.runtime not in RUNTIMES[1:]:
        raise ValueError(f"a runtime model runs on {' or '.join(RUNTIMES[1:])}, not {config.runtime!r}")
    out = copy.deepcopy(model)
    if config.runtime == "int8":
        warnings.warn(
            "int8: torch.ao.quantization.quantize_dynamic, which PyTorch deprecates in favour of torchao",
            stacklevel=2,
        )
        with warnings.catch_warnings():  # said once above, in place of its long deprecation notices
            warnings.simplefilter("ignore")
            quantization = torch.ao.quantization
            out = quantization.quantize_dynamic(out, {nn.Linear: quantization.per_channel_dynamic_qconfig})
    if not baseline:
        apply(out, config.method, keep=config.keep, **extra, **config.options)
    if config.runtime == "compile":
        from torch import _dynamo

        # the default mode's hooks split the graph at each hooked module, and transformers wraps the
        # forwards of several modules in one function (deprecate_kwarg): its frames, one per module
        # and per batch of one or more, share one limit
        limit = 2 * _dynamo.config.recompile_limit
        out = torch.compile(out, dynamic=True, recompile_limit=limit, isolate_recompiles=True)
    if config.runtime == "onnxruntime":
        out = OnnxRuntimeModel(out)
    setattr(out, BUILT_FOR, config.runtime)
    return out


def compilations() -> dict[str, int]:
    """What torch.compile did in this process so far: graphs compiled, graph breaks, and functions
    it stopped compiling at the recompile limit (they run eagerly from then on)."""
    from torch._dynamo.utils import counters

    limited = [n for k, n in counters["unimplemented"].items() if k.startswith("Dynamo recompile limit")]
    return {
        "graphs": counters["stats"]["unique_graphs"],
        "graph_breaks": sum(counters["graph_break"].values()),
        "limit_hits": sum(limited),
    }
