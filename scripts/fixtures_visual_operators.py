"""Fixtures for VisionZip, VTC-CLS, FastV, SparseVLM, AIM and Recoverable Compression: their authors'
own functions run on seeded inputs, inputs and outputs saved to tests/data/fixtures/<operator>.pt with
the repository and commit they came from. tests/test_authors_visual_operators.py compares tokenfuse
with them. ToDRE has no released code (none found for arXiv 2505.18757): no fixture.

Run in an environment of its own (nothing of the authors' code is committed):

    python3.11 -m venv /tmp/vlmauth
    /tmp/vlmauth/bin/pip install torch==2.13.0 numpy einops scikit-learn
    for r in dvlab-research/VisionZip@3151f6df4fca36a4cd1c985e5956e725b1f9ad02 \
             THU-MIG/VTC-CLS@e41ac9b4c0db235b3f68a84dbd6bd35f24156a7c \
             pkunlp-icler/FastV@d1659729b5bf1be225e99ee15783deeea80f63b1 \
             Gumpest/SparseVLMs@26a5f48813c46cd1c7364160354e7fdd3febaa67 \
             LaVi-Lab/AIM@edc24e9f3dfa99496ad332bd43ce20fa7b2cd30c \
             banjiuyufen/Recoverable-Compression@d927594467a0eff8bdf35e9c933f1423a4b1b760; do
        git clone https://github.com/${r%@*} /tmp/authors/${r%@*}
        git -C /tmp/authors/${r%@*} checkout ${r#*@}
    done
    /tmp/vlmauth/bin/python scripts/fixtures_visual_operators.py --root /tmp/authors

Each file is executed unmodified from the checkout; model-only imports (transformers, matplotlib, the
llava builders) are stubbed and never called by what runs. What runs, per operator:
- VisionZip: visionzip/clip_encoder.py `CLIPVisionTower_VisionZip.forward` on a stub tower returning
  seeded [CLS] attention, hidden states and keys (the `metric` its patched attention stores).
- VTC-CLS: llava/model/llava_arch.py `encode_images` with its clip_encoder.py `CLIPVisionTower.forward`
  (method "VTC-CLS") on a stub tower, identity projector; channel 0 of the features carries the index.
- FastV: the in-place token drop of src/transformers/.../llama/modeling_llama.py (the statements from
  `last_layer_attention = layer_outputs[1]` to `position_ids = ...`), executed from the file's text on a
  seeded attention map: that block sits inside LlamaModel.forward of a transformers fork.
- SparseVLM (v1.0): llava/model/language_model/score.py `attn_postprocess_topk` (the first stage, budget
  192), utils.py `cluster_and_merge`, and the recycling statements of modelling_sparse_llama.py
  (`merge_token_idx_stage1 = ...` to `cluster_num = ...`) executed from the file's text.
- AIM: llava/model/token_merge.py `bipartite_soft_matching_merge` twice (576 -> 288 -> 144, as its
  llava_arch.get_2dPool), the features carried with an identity block that records each output's
  members; other_packages/LLaVA-PruMerge/modeling_llama.py `get_importance` (PageRank) on seeded logits.
- Recoverable Compression: llava/model/multimodal_encoder/clip_encoder.py
  `CLIPVisionTower.token_recycling_with_text_clustering` on a stub tower whose layer-23 q/k projections
  fire the file's hooks; its Local Outlier Factor ratios recorded by calling its own function.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import textwrap
import types
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fixtures_divprune_cdpruner import OUT, commit, half_exact, load_arch  # noqa: E402


def stub_modules(names: dict[str, dict]) -> None:
    """Install modules `names` (name -> attributes); any other attribute is a class nobody calls."""
    for name, attributes in names.items():
        module = types.ModuleType(name)
        module.__path__ = []
        module.__getattr__ = lambda attr: type(attr, (nn.Module,), {})
        module.__dict__.update(attributes)
        sys.modules[name] = module


MODEL_ONLY = {
    n: {}
    for n in (
        "transformers",
        "transformers.models",
        "transformers.models.clip",
        "transformers.models.clip.modeling_clip",
        "transformers.modeling_outputs",
        "matplotlib",
        "matplotlib.pyplot",
    )
}


def load_file(path: Path, name: str) -> types.ModuleType:
    """Execute one of the authors' files as module `name` (a dotted name: in a package of its folder,
    for its relative imports), model-only imports stubbed."""
    stub_modules(MODEL_ONLY)
    if "." in name:
        package = types.ModuleType(name.rsplit(".", 1)[0])
        package.__path__ = [str(path.parent)]
        sys.modules[package.__name__] = package
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def run_lines(path: Path, first: str, last: str, namespace: dict, after: str = "") -> dict:
    """Execute the statements of `path` from the line starting with `first` to the one starting with
    `last` (both stripped, the first match after the line holding `after`), dedented, in `namespace`."""
    lines = path.read_text().splitlines()
    start = next(i for i, s in enumerate(lines) if after in s)
    begin = next(i for i in range(start, len(lines)) if lines[i].strip().startswith(first))
    end = next(i for i in range(begin, len(lines)) if lines[i].strip().startswith(last))
    exec(textwrap.dedent("\n".join(lines[begin : end + 1])), namespace)
    return namespace


def cls_rows(gen: torch.Generator, *shape: int) -> torch.Tensor:
    """Softmax rows of peaky random logits, fp16-exact: [CLS] attention with a few dominant tokens."""
    return half_exact(torch.softmax(2.5 * torch.randn(*shape, generator=gen), dim=-1))


def full_attention(row: torch.Tensor) -> torch.Tensor:
    """(B, H, N) [CLS] rows -> (B, H, N, N) maps holding them as row 0 (no other row is read)."""
    return torch.cat([row[:, :, None], row.new_zeros(*row.shape[:2], row.shape[-1] - 1, row.shape[-1])], 2)


def tower(**outputs) -> types.SimpleNamespace:
    return types.SimpleNamespace(**outputs)


def visionzip(repo: Path) -> dict:
    clip = load_file(repo / "visionzip/clip_encoder.py", "visionzip.clip_encoder")
    gen = torch.Generator().manual_seed(10)
    cases = []
    for name, images, dominant, contextual in (("llava15_64", 1, 54, 10), ("batch2_192", 2, 162, 30)):
        attention = cls_rows(gen, images, 16, 577)  # 16 heads: their sum ranks as tokenfuse's mean
        hidden = half_exact(torch.randn(images, 577, 12, generator=gen))
        keys = half_exact(torch.randn(images, 577, 8, generator=gen))
        layer = types.SimpleNamespace(metric=keys)
        host = types.SimpleNamespace(device="cpu", dtype=torch.float32)
        host.vision_tower = lambda x, a=attention, h=hidden, **kw: tower(
            attentions=(None, full_attention(a), None), hidden_states=(None, h, None)
        )
        host.vision_tower.vision_model = types.SimpleNamespace(
            encoder=types.SimpleNamespace(layers=[layer, layer, layer])
        )
        host.vision_tower._info = {"dominant": dominant - 1, "contextual": contextual}  # as visionzip()
        out, indices = clip.CLIPVisionTower_VisionZip.forward(host, torch.zeros(images, 3, 1, 1))
        cases.append(
            {"name": name, "dominant": dominant, "contextual": contextual, "cls_attention": attention.half()}
            | {"hidden": hidden.half(), "keys": keys.half(), "output": out, "indices": indices}
        )
    return {"function": "visionzip/clip_encoder.py: CLIPVisionTower_VisionZip.forward", "cases": cases}


def vtc_cls(repo: Path) -> dict:
    clip = load_file(repo / "llava/model/multimodal_encoder/clip_encoder.py", "vtc_clip")
    arch = load_arch(repo)
    gen = torch.Generator().manual_seed(11)
    attention = cls_rows(gen, 24, 1, 2, 577)  # CLIP ViT-L/14-336's 24 layers, 2 heads
    hidden = half_exact(torch.randn(1, 577, 8, generator=gen))
    hidden[..., 0] = torch.arange(-1, 576)  # the patch index rides along in channel 0
    stub = types.SimpleNamespace(device="cpu", dtype=torch.float32, select_layer=-2, select_feature="patch")
    stub.vision_tower = lambda x, **kw: tower(
        attentions=tuple(full_attention(a) for a in attention), hidden_states=(hidden,) * 25
    )
    stub.feature_select = types.MethodType(clip.CLIPVisionTower.feature_select, stub)
    stub.cls_token_only = types.MethodType(clip.CLIPVisionTower.cls_token_only, stub)
    projector = nn.Sequential(nn.Linear(8, 8))
    nn.init.eye_(projector[0].weight), nn.init.zeros_(projector[0].bias)

    class Host(arch.LlavaMetaForCausalLM):
        def __init__(self, start: int, kept: int) -> None:
            run = lambda images, **kw: clip.CLIPVisionTower.forward(stub, images, **kw)  # noqa: E731
            self.model = types.SimpleNamespace(
                method="VTC-CLS",
                token_num=kept,
                layer=start,
                get_vision_tower=lambda: run,
                mm_projector=projector,
            )

        def get_model(self):
            return self.model

    cases = []
    for start, kept in ((16, 64), (16, 192), (20, 64)):
        with torch.no_grad():
            out = Host(start, kept).encode_images(torch.zeros(1, 3, 1, 1))
        cases.append({"start_layer": start, "kept": kept, "indices": out[0, :, 0].long(), "output": out})
    return {
        "function": "llava/model/llava_arch.py: encode_images (VTC-CLS) with clip_encoder.py: "
        "CLIPVisionTower.forward, identity projector",
        "cls_attention_layers": attention[:, 0].half(),  # (24, 4, 577): [CLS] rows of each layer
        "hidden": hidden.half(),
        "cases": cases,
    }


def fastv(repo: Path) -> dict:
    path = repo / "src/transformers/src/transformers/models/llama/modeling_llama.py"
    gen = torch.Generator().manual_seed(12)
    system, image, text, heads = 35, 576, 20, 8
    length = system + image + text
    last_row = half_exact(torch.softmax(3 * torch.randn(heads, length, generator=gen), -1))
    hidden = half_exact(torch.randn(1, length, 16, generator=gen))
    attention = torch.zeros(1, heads, length, length)
    attention[0, :, -1] = last_row
    cases = []
    for rank in (288, 144):  # FastV's K=2 R=50% (its default) and R=75%
        ns = {"torch": torch, "layer_outputs": (hidden, attention), "hidden_states": hidden, "device": "cpu"}
        ns |= {"SYS_LENGTH": system, "IMAGE_TOKEN_LENGTH": image, "ATTENTION_RANK": rank}
        ns |= {"seq_length_with_past": length}
        run_lines(path, "last_layer_attention = layer_outputs[1]", "position_ids = keep_indexs", ns,
                  after="if USE_FAST_V and FASTV_INPLACE")  # fmt: skip
        cases.append({"rank": rank, "keep_indexs": ns["keep_indexs"], "output": ns["hidden_states"]})
    return {
        "function": "src/transformers/src/transformers/models/llama/modeling_llama.py: LlamaModel.forward, "
        "the FastV in-place block (attention rank, kept indices, filtered hidden states)",
        "system": system,
        "image": image,
        "last_row": last_row.half(),
        "hidden": hidden.half(),
        "cases": cases,
    }


def sparsevlm(repo: Path) -> dict:
    os.environ.update(USE_VERSION="1_0", RETAIN_TOKN="192")
    lm = repo / "llava/model/language_model"
    score = load_file(lm / "score.py", "sparsevlm_score")
    utils = load_file(lm / "utils.py", "sparsevlm_utils")
    gen = torch.Generator().manual_seed(13)
    system, image, text, heads = 35, 576, 12, 4
    length = system + image + text
    # each text row's attention, over the causal prefix; other rows are never read
    text_rows = torch.softmax(3 * torch.randn(heads, text, length, generator=gen), -1)
    causal = torch.arange(length)[None] <= torch.arange(system + image, length)[:, None]
    text_rows = half_exact(text_rows * causal / (text_rows * causal).sum(-1, keepdim=True))
    attention = torch.zeros(1, heads, length, length)
    attention[0, :, system + image :] = text_rows
    hidden = half_exact(torch.randn(1, length, 16, generator=gen))
    raters = (torch.zeros(1, dtype=torch.long), torch.randperm(text, generator=gen)[:5].sort().values)
    mask, _, relation = score.attn_postprocess_topk(attention, system, image, system + image, raters, 2)
    policy = torch.ones(1, length)
    policy[:, system : system + image] = mask.float()
    total_sparse_token = hidden[:, (policy == 0)[0]]
    ns = {"torch": torch, "pred_score_vis": mask, "relation_vis_text": relation}
    ns |= {"total_sparse_token": total_sparse_token}
    run_lines(lm / "modelling_sparse_llama.py", "merge_token_idx_stage1 =", "cluster_num =", ns)
    torch.manual_seed(0)  # the density's 1e-6 noise
    merged = utils.cluster_and_merge(ns["merge_token_stage2"], ns["cluster_num"])
    return {
        "function": "llava/model/language_model/score.py: attn_postprocess_topk (first stage, budget 192); "
        "modelling_sparse_llama.py: the recycling statements; utils.py: cluster_and_merge",
        "system": system,
        "image": image,
        "text_rows": text_rows.half(),
        "hidden": hidden.half(),
        "raters": raters[1],
        "kept": mask[0],
        "relation": relation[0],
        "recycled": (policy == 0)[0].nonzero()[:, 0][ns["merge_token_stage2_idx"]] - system,
        "clusters": ns["cluster_num"],
        "merged": merged[0],
    }


def aim(repo: Path) -> dict:
    merge = load_file(repo / "llava/model/token_merge.py", "aim_token_merge").bipartite_soft_matching_merge
    gen = torch.Generator().manual_seed(14)
    features = half_exact(torch.randn(1, 576, 12, generator=gen))
    carried = torch.cat([features, torch.eye(576)[None]], -1)  # the identity block: who is in each output
    for r in (576 // 2, 576 // 4):  # llava_arch.get_2dPool's two rounds
        carried = merge(metric=carried[..., :12], r=r, x=carried)
    system, image, text, heads, dim = 5, 144, 11, 4, 16
    length = system + image + text
    q = half_exact(torch.randn(1, heads, length, dim, generator=gen))
    k = half_exact(torch.randn(1, heads, length, dim, generator=gen))
    logits = (q @ k.transpose(-1, -2)) / dim**0.5
    future = torch.ones(length, length, dtype=torch.bool).triu(1)
    logits = logits + future * torch.finfo(torch.float32).min  # added, as its _make_causal_mask
    source = (repo / "other_packages/LLaVA-PruMerge/modeling_llama.py").read_text()
    ns = {"torch": torch, "nn": nn}
    exec(
        source[source.index("def get_importance") : source.index("# Copied from transformers.models.bart")],
        ns,
    )
    return {
        "function": "llava/model/token_merge.py: bipartite_soft_matching_merge, two rounds as "
        "llava_arch.get_2dPool; other_packages/LLaVA-PruMerge/modeling_llama.py: get_importance",
        "features": features.half(),
        "merged": carried[0, :, :12].clone(),
        "group": carried[0, :, 12:].argmax(0).short(),  # the output each input token went into
        "prune": {"system": system, "image": image, "q": q.half(), "k": k.half()}
        | {"importance": ns["get_importance"](logits)[0]},
    }


def recoverable(repo: Path) -> dict:
    clip = load_file(repo / "llava/model/multimodal_encoder/clip_encoder.py", "rc_clip")
    gen = torch.Generator().manual_seed(15)
    n, width = 576, 16
    hidden = half_exact(torch.randn(1, n + 1, width, generator=gen))
    q = half_exact(torch.randn(1, n + 1, width, generator=gen))
    k = half_exact(torch.randn(1, n + 1, width, generator=gen))
    q[:, 0] *= 6  # a peaky [CLS] row, as a trained tower's
    similarity = half_exact(torch.randn(1, 1, n, generator=gen) * 0.05)
    projections = [nn.Module() for _ in range(24)]
    for p in projections:
        p.self_attn = nn.Module()
        p.self_attn.q_proj, p.self_attn.k_proj = nn.Identity(), nn.Identity()

    def run(x, **kw):
        projections[23].self_attn.q_proj(q), projections[23].self_attn.k_proj(k)  # fire the file's hooks
        return tower(hidden_states=(hidden,) * 25)

    stub = types.SimpleNamespace(device="cpu", dtype=torch.float32, select_layer=-2, select_feature="patch")
    stub.vision_tower = run
    stub.vision_tower.vision_model = types.SimpleNamespace(encoder=types.SimpleNamespace(layers=projections))
    stub.feature_select = types.MethodType(clip.CLIPVisionTower.feature_select, stub)
    out = clip.CLIPVisionTower.token_recycling_with_text_clustering(stub, torch.zeros(1, 3), (similarity, ""))
    cls = torch.softmax((q @ k.transpose(-1, -2)) * width**-0.5, -1)[:, 0, 1:]
    ratios = [clip.find_max_derivative_position(cls), clip.find_max_derivative_position(similarity[:, 0])]
    return {
        "function": "llava/model/multimodal_encoder/clip_encoder.py: "
        "CLIPVisionTower.token_recycling_with_text_clustering (the ratios: its find_max_derivative_position)",
        "hidden": hidden.half(),
        "q": q.half(),
        "k": k.half(),
        "similarity": similarity.half(),
        "vision_count": int(n * ratios[0]),
        "text_count": int(n * ratios[1]),
        "output": out[0],
    }


OPERATORS = {
    "visionzip": ("dvlab-research/VisionZip", visionzip),
    "vtc_cls": ("THU-MIG/VTC-CLS", vtc_cls),
    "fastv": ("pkunlp-icler/FastV", fastv),
    "sparsevlm": ("Gumpest/SparseVLMs", sparsevlm),
    "aim": ("LaVi-Lab/AIM", aim),
    "recoverable": ("banjiuyufen/Recoverable-Compression", recoverable),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, required=True, help="holds OWNER/NAME checkouts")
    parser.add_argument("--only", nargs="*", choices=sorted(OPERATORS), help="some operators only")
    args = parser.parse_args()
    for name in args.only or OPERATORS:
        repository, make = OPERATORS[name]
        repo = args.root / repository
        fixture = {"repository": repository, "commit": commit(repo), "torch": str(torch.__version__)}
        torch.save(fixture | make(repo), OUT / f"{name}.pt")
        print(f"wrote {OUT / name}.pt ({(OUT / f'{name}.pt').stat().st_size} bytes)")


if __name__ == "__main__":
    main()
