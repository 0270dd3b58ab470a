"""Fixtures for DivPrune and CDPruner: their authors' own selection functions run on seeded inputs, the
inputs and the selections saved to tests/data/fixtures/{divprune,cdpruner}.pt with the repository and
commit they came from. tests/test_vlm_diversity_operators.py compares tokenfuse's selections with them.

Run in an environment of its own (not the project's; nothing of the authors' code is committed):

    python3.11 -m venv /tmp/authors-venv
    /tmp/authors-venv/bin/pip install torch numpy
    git clone https://github.com/vbdi/divprune /tmp/divprune
    git -C /tmp/divprune checkout 799e2d950aa01ba7860907f5a6d86061f885dca6
    git clone https://github.com/Theia-4869/CDPruner /tmp/cdpruner
    git -C /tmp/cdpruner checkout 9541616c40fcd5625de1cdb8ea6c33c129eb7864
    /tmp/authors-venv/bin/python scripts/fixtures_divprune_cdpruner.py --divprune /tmp/divprune \
        --cdpruner /tmp/cdpruner

Both repositories pin torch 2.1.2 and transformers 4.37.2; the functions run here use torch alone (the
fixtures were made with torch 2.13, the version the registry offers). Each repository's
llava/model/llava_arch.py is executed unmodified from its file; its package imports (the vision tower
and projector builders, llava.mm_utils, which need transformers 4.37) are replaced by stubs that the
functions run here never call. What runs:
- DivPrune: `LlavaMetaForCausalLM.DivPrune(features, N, None, threshold_ratio)`, the selection the
  reference applies to the LLM's input embeddings of an image (returns the picks in greedy order).
- CDPruner: `LlavaMetaForCausalLM.encode_images(images, texts)`, with a vision tower stub returning the
  seeded (tower features, CLIP image embeddings, CLIP text embeddings) and an identity projector, so the
  tower features are the projected features; returns each image's kept-token mask.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import types
from pathlib import Path

import torch
from torch import nn

OUT = Path(__file__).resolve().parent.parent / "tests" / "data" / "fixtures"


def load_arch(package_root: Path) -> types.ModuleType:
    """The authors' llava/model/llava_arch.py under `package_root` (the folder holding llava/), run
    from its file with the imports it needs only for model code stubbed."""
    for name in list(sys.modules):
        if name == "llava" or name.startswith("llava."):
            del sys.modules[name]

    def unused(*args, **kwargs):
        raise RuntimeError("stub: not part of the function under test")

    stubs = {
        "llava": {},
        "llava.model": {},
        "llava.model.multimodal_encoder": {},
        "llava.model.multimodal_encoder.builder": {"build_vision_tower": unused},
        "llava.model.multimodal_projector": {},
        "llava.model.multimodal_projector.builder": {"build_vision_projector": unused},
        "llava.mm_utils": {"get_anyres_image_grid_shape": unused},
    }
    for name, attributes in stubs.items():
        module = types.ModuleType(name)
        module.__path__ = []
        module.__dict__.update(attributes)
        sys.modules[name] = module
    for name in ("llava.constants", "llava.model.llava_arch"):
        path = package_root / (name.replace(".", "/") + ".py")
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules["llava.model.llava_arch"]


def commit(repo: Path) -> str:
    return subprocess.run(
        ["git", "-C", str(repo), "rev-parse", "HEAD"], check=True, capture_output=True, text=True
    ).stdout.strip()


def clustered(gen: torch.Generator, n: int, dim: int, clusters: int, spread: float) -> torch.Tensor:
    """(n, dim) tokens around `clusters` random centres: structure for the greedy to find."""
    centres = torch.randn(clusters, dim, generator=gen) * 3
    members = torch.randint(0, clusters, (n,), generator=gen)
    return centres[members] + spread * torch.randn(n, dim, generator=gen)


def half_exact(x: torch.Tensor) -> torch.Tensor:
    """x rounded to float16 values, kept as float32: the functions run in float32 on values the fixture
    stores exactly at half the size."""
    return x.half().float()


def divprune_cases(repo: Path) -> dict:
    arch = load_arch(repo / "LLaVA")

    class Host(arch.LlavaMetaForCausalLM):
        def get_model(self):
            raise RuntimeError("stub: not part of the function under test")

    host = Host()
    gen = torch.Generator().manual_seed(0)
    inputs = [  # (name, features, ratio): the paper's LLaVA-1.5 setting first
        ("llava15_576_ratio0.098", half_exact(torch.randn(576, 32, generator=gen)), 0.098),
        ("clustered_196_ratio0.25", half_exact(clustered(gen, 196, 16, 12, 0.3)), 0.25),
        ("lowdim_100_ratio0.5", half_exact(torch.randn(100, 6, generator=gen)), 0.5),
    ]
    cases = []
    for name, features, ratio in inputs:
        picks, _ = host.DivPrune(features, features.shape[0], None, threshold_ratio=ratio)
        cases.append({"name": name, "features": features.half(), "ratio": ratio, "picks": picks})
    return {
        "repository": "vbdi/divprune",
        "commit": commit(repo),
        "function": "LLaVA/llava/model/llava_arch.py: LlavaMetaForCausalLM.DivPrune",
        "torch": str(torch.__version__),
        "cases": cases,
    }


def cdpruner_cases(repo: Path) -> dict:
    arch = load_arch(repo)

    class Host(arch.LlavaMetaForCausalLM):
        def __init__(self, tower_out, kept: int) -> None:
            tower = lambda images, texts=None: tower_out  # noqa: E731
            self.model = types.SimpleNamespace(get_vision_tower=lambda: tower, mm_projector=nn.Identity())
            self.visual_token_num = kept

        def get_model(self):
            return self.model

    def run(features, embeds, text, kept):
        dummy = torch.zeros(features.shape[0], 3, 1, 1)
        _, masks = Host((features, embeds, text), kept).encode_images(dummy, texts="stub")
        return masks

    gen = torch.Generator().manual_seed(1)
    cases = []
    # more feature dimensions than kept tokens in every case: past the kernel's rank the greedy's gains
    # are rounding noise, and the reference can take a NaN gain's token twice (see tokenfuse's cdpruner.py)
    for name, n, dim, clip_dim, segments, kept, images in (
        ("llava15_576_keep64", 576, 66, 16, 1, 64, 1),
        ("clustered_196_two_text_segments_keep49", 196, 56, 8, 2, 49, 1),
        ("batch_of_two_144_keep32", 144, 40, 12, 1, 32, 2),
    ):
        features = half_exact(torch.stack([clustered(gen, n, dim, 10, 1.0) for _ in range(images)]))
        embeds = torch.randn(images, n, clip_dim, generator=gen)
        text = half_exact(torch.randn(segments, clip_dim, generator=gen))
        if images == 2:  # the second image nearer the text: the batch's min-max differs from its own
            embeds[1] += 1.5 * text.mean(0)
        embeds = half_exact(embeds)
        alone = torch.cat([run(features[b : b + 1], embeds[b : b + 1], text, kept) for b in range(images)])
        case = {"name": name, "kept": kept} | {
            k: v.half() for k, v in (("features", features), ("embeds", embeds), ("text", text))
        }
        case["mask_alone"] = alone
        if images > 1:
            case["mask_batched"] = run(features, embeds, text, kept)
        cases.append(case)
    return {
        "repository": "Theia-4869/CDPruner",
        "commit": commit(repo),
        "function": "llava/model/llava_arch.py: LlavaMetaForCausalLM.encode_images (relevance, kernel, "
        "fast greedy MAP), tower stubbed, identity projector",
        "torch": str(torch.__version__),
        "cases": cases,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--divprune", type=Path, required=True, help="a checkout of vbdi/divprune")
    parser.add_argument("--cdpruner", type=Path, required=True, help="a checkout of Theia-4869/CDPruner")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    torch.save(divprune_cases(args.divprune), OUT / "divprune.pt")
    torch.save(cdpruner_cases(args.cdpruner), OUT / "cdpruner.pt")
    for name in ("divprune.pt", "cdpruner.pt"):
        print(f"wrote {OUT / name} ({(OUT / name).stat().st_size} bytes)")


if __name__ == "__main__":
    main()
