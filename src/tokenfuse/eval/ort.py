"""The onnxruntime runtime of the benches: a model (reduced in static mode, or not reduced) exported
with `tokenfuse.api.onnx.export_onnx` and run by ONNX Runtime's CPU provider, with as many threads
as torch uses: the model as a user serves it without PyTorch."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from torch import Tensor, nn

from ..api.onnx import export_onnx


class OnnxRuntimeModel(nn.Module):
    """Called with (input_ids, attention_mask), gives what the exported graph gives (`OUTPUTS`): the
    last hidden states, the token sizes to pool them by, the tokens each layer processed. `config`
    is the exported model's. It holds no parameters: the graph holds the weights."""

    def __init__(self, model: nn.Module):
        super().__init__()
        import onnxruntime as ort

        self.config = model.config
        with tempfile.TemporaryDirectory() as folder:
            path = export_onnx(model, Path(folder) / "encoder.onnx")
            options = ort.SessionOptions()
            options.intra_op_num_threads = torch.get_num_threads()
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        feed = {"input_ids": input_ids.cpu().numpy(), "attention_mask": attention_mask.cpu().numpy()}
        return tuple(torch.from_numpy(out) for out in self.session.run(None, feed))
