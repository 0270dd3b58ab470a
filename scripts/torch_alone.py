"""Import tokenfuse and reduce tokens with torch alone: `make test` runs it in `.venv-core` (torch and
the library, nothing else installed); tests/test_layers.py runs it with `--block`, which makes the
heavier packages of the full environment unimportable first."""

import sys
import warnings

BLOCKED = ("numpy", "rich", "transformers", "timm", "matplotlib", "onnx", "onnxruntime")

if "--block" in sys.argv:
    for name in BLOCKED:
        sys.modules[name] = None  # `import name` now fails
warnings.filterwarnings("ignore", message="Failed to initialize NumPy")  # torch without numpy says so

import torch  # noqa: E402

import tokenfuse  # noqa: E402
from tokenfuse.methods import LayerInput, make  # noqa: E402

x = torch.randn(2, 8, 4)
mask = torch.ones(2, 8, dtype=torch.bool)
tokens = tokenfuse.Tokens.start(mask, torch.zeros_like(mask))
red = make("tome").decide(LayerInput(point=0, x=x, tokens=tokens, remove=torch.tensor([2, 3])))
out, after = tokenfuse.reduce(x, tokens, red)
assert out.shape == (2, 6, 4) and after.count.tolist() == [6, 5], after.count
print(f"tokenfuse imports and reduces with torch {torch.__version__} alone")
