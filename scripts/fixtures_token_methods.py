"""Fixtures for the token methods EViT, ATS, Zero-TPrune, PiToMe and MCTF: each one's defining step at
one layer, run from its authors' repository on seeded inputs; inputs and outputs saved to
tests/data/fixtures/<method>.pt with the repository and commit they came from.
tests/test_authors_token_methods.py compares tokenfuse's decisions with them. Token Transforming has
no fixture: its repository (AuroraZengfh/TokenTransforming, dedcac5cdd32f51acadc7f935b55348510457e5d)
holds a README and a licence only.

Run in an environment of its own (nothing of the authors' code is committed):

    python3.11 -m venv /tmp/authors-token-venv
    /tmp/authors-token-venv/bin/pip install torch==2.13.0 numpy
    git clone https://github.com/youweiliang/evit /tmp/authors/evit
    git -C /tmp/authors/evit checkout 5ca95a7cf4a8637193284895c5bc0dd9dc365982
    git clone https://github.com/adaptivetokensampling/ATS /tmp/authors/ATS
    git -C /tmp/authors/ATS checkout 9271257adc7ea9695c2ccd75e25e3a86432fd65a
    git clone https://github.com/Hongjiew/Transformer_pruning /tmp/authors/Transformer_pruning
    git -C /tmp/authors/Transformer_pruning checkout 52a4607fd840afdd8cba7c1321eebb155f25e5de
    git clone https://github.com/hchautran/PiToMe /tmp/authors/PiToMe
    git -C /tmp/authors/PiToMe checkout 550b5deed94aadfeac28bfbe381d87e672044a40
    git clone https://github.com/mlvlab/MCTF /tmp/authors/MCTF
    git -C /tmp/authors/MCTF checkout 2004da0cad3231fa74cbd60b6042b0bd133aacde
    /tmp/authors-token-venv/bin/python scripts/fixtures_token_methods.py --root /tmp/authors

The repositories need timm (and some CUDA) to import as packages; the functions run here need torch
alone, so each is taken unmodified from its file by name (Python's ast: the source of that function
or class, executed with torch, nn, F and math in scope). What runs:
- EViT, evit.py: `Block(fuse_token=True, keep_rate=0.7)` (with its Attention, Mlp and helpers.py's
  complement_idx) in eval mode, its MLP replaced by zeros so that its output is the reorganised
  tokens; the hidden states at the reorganisation, q and k are taken from hooks.
- ATS, libs/models/transformers/ats_block.py: AdaptiveTokenSampler's score_assignment_step,
  create_ys, get_unique_indices and inverse_transform_sampling, with transformer_block.py's
  softmax_with_policy, as its forward calls them (n_tokens = n_ref_tokens = N, DeiT's setting).
- Zero-TPrune: the paper's code is not released (its project page links none); the first author's
  course project that preceded it (Hongjiew/Transformer_pruning, "Zero-TPrune ... Final Project")
  has the per-head weighted PageRank with root-mean-square head aggregation in
  tokenrank_vit_em.py: Attention.get_importance (tau_imp = 1: the layer's own attention, 5
  iterations) and the eval-mode top-(retain_rate) selection of its forward.
- PiToMe, algo/pitome/merge.py: pitome_vision (the paper's ELU energy, alternate split) and
  pitome_text (Gaussian energy, halves split), applied with merge_wavg and merge_source.
- MCTF, utils/mctf.py: bipartite_soft_matching (tau_sim 1, tau_info 20, tau_size 40,
  bidirectional, the run/eval_deit_s_mctf.sh setting) with merge_wavg (pooling_type 0: size, 1:
  attention) and merge_source.
"""

from __future__ import annotations

import argparse
import ast
import math
import subprocess
import types
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

OUT = Path(__file__).resolve().parent.parent / "tests" / "data" / "fixtures"


def commit(repo: Path) -> str:
    return subprocess.run(
        ["git", "-C", str(repo), "rev-parse", "HEAD"], check=True, capture_output=True, text=True
    ).stdout.strip()


def extract(path: Path, *names: str, scope: dict | None = None) -> dict:
    """The named top-level functions/classes, or methods as `Class.method` (taken out as plain
    functions), of the file at `path`, executed unmodified in a namespace holding torch alone."""
    tree = ast.parse(path.read_text())
    source = path.read_text()
    found = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.ClassDef):
            found[node.name] = node
            if isinstance(node, ast.ClassDef):
                for item in node.body:
                    if isinstance(item, ast.FunctionDef):
                        found[f"{node.name}.{item.name}"] = item
    namespace = {"torch": torch, "nn": nn, "F": F, "math": math, "Tensor": Tensor} | (scope or {})
    exec("from typing import Callable, List, Tuple, Union", namespace)
    for name in names:
        node = found[name]
        segment = ast.get_source_segment(source, node, padded=True)
        lines = segment.splitlines()
        indent = len(lines[0]) - len(lines[0].lstrip())
        body = "\n".join(line[indent:] for line in lines)
        body = "\n".join(line for line in body.splitlines() if line.strip() != "@staticmethod")
        exec(body, namespace)
        if "." in name:
            namespace[name] = namespace[node.name]
    return namespace


def qkv(gen: torch.Generator, B: int, H: int, N: int, D: int, spread: float = 1.0):
    q, k, v = (half_exact(spread * torch.randn(B, H, N, D, generator=gen)) for _ in range(3))
    return q, k, v


def half_exact(x: Tensor) -> Tensor:
    """x rounded to float16 values, kept as float32: the functions run in float32 on inputs that the
    fixture stores exactly at half the size (`compact`)."""
    return x.half().float()


def clustered(gen: torch.Generator, B: int, N: int, C: int, clusters: int, spread: float) -> Tensor:
    centres = torch.randn(B, clusters, C, generator=gen)
    members = torch.randint(0, clusters, (B, N), generator=gen)
    x = centres.gather(1, members[..., None].expand(-1, -1, C)) + spread * torch.randn(B, N, C, generator=gen)
    return half_exact(x)


def evit(repo: Path) -> dict:
    ns = extract(repo / "helpers.py", "complement_idx")
    ns = extract(repo / "evit.py", "drop_path", "DropPath", "Mlp", "Attention", "Block", scope=ns)
    cases = []
    for seed, (B, N, C, H, keep_rate) in enumerate([(2, 50, 32, 4, 0.7), (2, 50, 24, 3, 0.5)]):
        torch.manual_seed(seed)
        block = ns["Block"](C, H, qkv_bias=True, keep_rate=keep_rate, fuse_token=True).eval()
        block.mlp = _Zero()
        seen = {}
        block.attn.qkv.register_forward_hook(lambda m, i, o, seen=seen: seen.__setitem__("qkv", o))
        block.attn.register_forward_hook(lambda m, i, o, seen=seen: seen.__setitem__("attn", o))
        x = torch.randn(B, N, C, generator=torch.Generator().manual_seed(100 + seed))
        with torch.no_grad():
            out, _, idx = block(x, get_idx=True)
        qkv_ = seen["qkv"].reshape(B, N, 3, H, C // H).permute(2, 0, 3, 1, 4)
        tmp, _, _, cls_attn, left = seen["attn"]
        cases.append(
            {
                "keep_rate": keep_rate,
                "hidden": x + tmp,  # the tokens at the reorganisation (after the attention's residual)
                "q": qkv_[0],
                "k": qkv_[1],
                "cls_attn": cls_attn,
                "left_tokens": left,
                "idx": idx,  # the kept patches (0 = first patch), most attended first
                "out": out,  # [CLS], the kept tokens in idx's order, the fused token
            }
        )
    return {
        "repository": "youweiliang/evit",
        "commit": commit(repo),
        "function": "evit.py: Block.forward with Attention.forward (fuse_token=True), MLP zeroed",
        "torch": str(torch.__version__),
        "cases": cases,
    }


class _Zero(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return torch.zeros_like(x)


def ats(repo: Path) -> dict:
    folder = repo / "libs" / "models" / "transformers"
    ns = extract(folder / "transformer_block.py", "Attention.softmax_with_policy")
    ns = extract(
        folder / "ats_block.py",
        "AdaptiveTokenSampler.get_unique_indices",
        "AdaptiveTokenSampler.create_ys",
        "AdaptiveTokenSampler.score_assignment_step",
        "AdaptiveTokenSampler.inverse_transform_sampling",
        scope=ns,
    )
    cases = []
    gen = torch.Generator().manual_seed(1)
    for B, N, C, H, spread in [(2, 50, 32, 4, 1.0), (2, 65, 24, 3, 2.0)]:
        q, k, v = qkv(gen, B, H, N, C // H, spread)
        x = half_exact(torch.randn(B, N, C, generator=gen))
        policy = torch.ones(B, N, 1)
        attn = ns["softmax_with_policy"]((q @ k.transpose(-2, -1)) * (C // H) ** -0.5, policy)
        scores, indices = ns["score_assignment_step"](attn, v)
        host = types.SimpleNamespace(
            num_heads=H, create_ys=ns["create_ys"], get_unique_indices=ns["get_unique_indices"]
        )
        selected, _, policy, _ = ns["inverse_transform_sampling"](host, scores, indices, attn, N, x, N)
        # which tokens the sampler kept: [CLS] and each sampled row of selected_x, found in x
        kept = torch.zeros(B, N, dtype=torch.bool)
        for b in range(B):
            rows = selected[b][policy[b, :, 0] > 0]
            kept[b] = (rows[:, None, :] == x[b][None]).all(-1).any(0)
        cases.append(
            {"q": q, "k": k, "v": v, "x": x, "sorted_scores": scores, "sorted_indices": indices, "kept": kept}
        )
    return {
        "repository": "adaptivetokensampling/ATS",
        "commit": commit(repo),
        "function": "libs/models/transformers/ats_block.py: AdaptiveTokenSampler.score_assignment_step, "
        "inverse_transform_sampling (n_tokens = n_ref_tokens = N)",
        "torch": str(torch.__version__),
        "cases": cases,
    }


def zero_tprune(repo: Path) -> dict:
    ns = extract(repo / "tokenrank_vit_em.py", "Attention.get_importance")
    cases = []
    gen = torch.Generator().manual_seed(2)
    for B, N, H, D, spread, retain in [(2, 50, 4, 8, 1.0, 0.8), (2, 65, 6, 8, 0.6, 0.7)]:
        q, k, _ = qkv(gen, B, H, N, D, spread)
        logits = (q @ k.transpose(-2, -1)) * D**-0.5
        importance = ns["get_importance"](None, logits, None, tau_imp=1.0)  # (B, N - 1), iters = 5
        _, inds = torch.sort(importance, dim=-1, descending=True)  # the eval-mode forward's selection
        inds = inds[:, : int(inds.shape[1] * retain)]
        kept = torch.zeros(B, N - 1).scatter_(1, inds, 1).bool()
        cases.append({"q": q, "k": k, "retain_rate": retain, "importance": importance, "kept": kept})
    return {
        "repository": "Hongjiew/Transformer_pruning",
        "commit": commit(repo),
        "function": "tokenrank_vit_em.py: Attention.get_importance (tau_imp=1, iters=5) and the "
        "eval-mode top-retain_rate selection",
        "torch": str(torch.__version__),
        "cases": cases,
    }


def pitome(repo: Path) -> dict:
    ns = extract(
        repo / "algo" / "pitome" / "merge.py",
        "do_nothing",
        "bsm",
        "pitome",
        "pitome_bsm",
        "pitome_vision",
        "pitome_text",
        "merge_wavg",
        "merge_source",
    )
    cases = []
    gen = torch.Generator().manual_seed(3)
    for form, B, N, C, margin, ratio in [
        ("vision", 2, 49, 16, 0.75, 0.8),
        ("vision", 2, 65, 12, 0.3, 0.6),
        ("text", 2, 49, 16, 0.75, 0.8),
        ("text", 2, 65, 12, 0.675, 0.6),
    ]:
        x = clustered(gen, B, N, C, 8, 0.5)
        if form == "vision":
            merge = ns["pitome_vision"](metric=x, ratio=ratio, margin=margin, class_token=True)
        else:
            merge = ns["pitome_text"](metric=x, ratio=ratio, margin=margin, class_token=True)
        source = ns["merge_source"](merge, x) > 0
        out, size = ns["merge_wavg"](merge, x)
        cases.append(
            {
                "form": form,
                "x": x,
                "margin": margin,
                "ratio": ratio,
                "out": out,
                "size": size,
                "source": source,
            }
        )
    return {
        "repository": "hchautran/PiToMe",
        "commit": commit(repo),
        "function": "algo/pitome/merge.py: pitome_vision / pitome_text (class_token=True), merge_wavg, "
        "merge_source",
        "torch": str(torch.__version__),
        "cases": cases,
    }


def mctf(repo: Path) -> dict:
    ns = extract(
        repo / "utils" / "mctf.py", "do_nothing", "bipartite_soft_matching", "merge_wavg", "merge_source"
    )
    cases = []
    gen = torch.Generator().manual_seed(4)
    for B, N, C, H, r, sized in [(2, 49, 16, 4, 16, False), (2, 65, 24, 3, 20, True)]:
        x = clustered(gen, B, N, C, 10, 0.7)
        q, k, _ = qkv(gen, B, H, N, C // H)
        size = torch.randint(1, 4, (B, N, 1), generator=gen).float() if sized else torch.ones(B, N, 1)
        size[:, 0] = 1
        # the layer's attention, proportional to size as the reference's (and tokenfuse's) attention
        attn = ((q @ k.transpose(-2, -1)) * (C // H) ** -0.5 + size.log()[:, None, None, :, 0]).softmax(-1)
        case = {"x": x, "q": q, "k": k, "size": size, "r": r}
        for pooling in (0, 1):
            merge, _ = ns["bipartite_soft_matching"](
                x,
                attn=attn,
                size=size,
                r=r,
                num_protected=1,
                tau_sim=1,
                tau_info=20,
                tau_size=40,
                bidirection=1,
            )
            case[f"source_{pooling}"] = ns["merge_source"](merge, x) > 0
            case[f"out_{pooling}"], case[f"size_{pooling}"], _ = ns["merge_wavg"](
                merge, x, size, attn, one_step_ahead=0, pooling_type=pooling
            )
        cases.append(case)
    return {
        "repository": "mlvlab/MCTF",
        "commit": commit(repo),
        "function": "utils/mctf.py: bipartite_soft_matching (num_protected=1, tau 1/20/40, bidirection=1), "
        "merge_wavg (pooling_type 0 and 1), merge_source",
        "torch": str(torch.__version__),
        "cases": cases,
    }


def compact(value):
    """Tensors cloned out of the views they may be (a view saves its whole storage); float tensors
    whose values float16 holds exactly are stored as float16 (the tests read them back as float32)."""
    if isinstance(value, Tensor):
        value = value.detach().clone()
        if value.dtype == torch.float32 and torch.equal(value.half().float(), value):
            return value.half()
        return value
    if isinstance(value, dict):
        return {key: compact(item) for key, item in value.items()}
    if isinstance(value, list):
        return [compact(item) for item in value]
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, required=True, help="the folder holding the five checkouts")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    made = {
        "evit": evit(args.root / "evit"),
        "ats": ats(args.root / "ATS"),
        "zero_tprune": zero_tprune(args.root / "Transformer_pruning"),
        "pitome": pitome(args.root / "PiToMe"),
        "mctf": mctf(args.root / "MCTF"),
    }
    for name, fixture in made.items():
        torch.save(compact(fixture), OUT / f"{name}.pt")
        print(f"wrote {OUT / name}.pt ({(OUT / f'{name}.pt').stat().st_size} bytes)")


if __name__ == "__main__":
    main()
