"""Train the small Fashion-MNIST ViT whose weights ship in src/tokenfuse/weights/fmnist_vit/.

Deterministic on CPU: fixed seeds, deterministic algorithms, a fixed thread count, a seeded data
order and augmentation. Reproduce the committed weights with

    python scripts/train_fmnist.py --out src/tokenfuse/weights/fmnist_vit

`--val` holds out the last 5000 training images, reports validation accuracy per epoch and never
touches the test set (use it to tune; the test set is for the final report only).
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
from transformers import ViTConfig, ViTForImageClassification

from tokenfuse.assets import fmnist

VAL_SIZE = 5000

# Written into TRAINING.md: how the defaults below were picked (validation runs, `--val`).
TUNING = """
## How the settings were chosen

Validation runs (`--val`: trained on the first 55,000 training images, scored on the last 5,000; one
thread each, two at a time, on the shared 2 cores; the test set was not used). Hidden 96, 6 layers,
batch 128, lr 1e-3 and a 5-epoch schedule unless noted; validation top-1 after epochs 1 and 2:

| augmentation | label smoothing | other | epoch 1 | epoch 2 |
|---|---|---|---|---|
| 2-px crop + flip | 0.1 | | 0.699 | 0.773 |
| 2-px crop + flip | 0.1 | lr 2e-3 | 0.723 | 0.742 |
| 2-px crop + flip | 0.1 | lr 2e-3, batch 64 | 0.718 | 0.745 |
| 2-px crop + flip | 0.1 | hidden 128, 3-epoch schedule | 0.726 | |
| none | 0 | | 0.798 | 0.838 |
| flip | 0 | | 0.804 | |

In a budget of a few epochs the random crop costs about 10 points and the flip costs nothing, so the
weights use the flip only (`--pad 2` restores the crop). Hidden 96 trains an epoch about 1.5x faster
than hidden 128 on these cores, so 4 epochs fit in the ~10-minute budget instead of 3.
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="folder for the weights and TRAINING.md")
    p.add_argument("--data", type=Path, default=None, help="folder holding the IDX files (default: Debian's)")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate")
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup", type=float, default=0.05, help="fraction of steps with a linear warm-up")
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--hidden", type=int, default=96)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--mlp-ratio", type=int, default=4)
    p.add_argument("--pad", type=int, default=0, help="random-crop padding in pixels (0: no crop)")
    p.add_argument("--flip", type=float, default=0.5, help="horizontal-flip probability")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--val", action="store_true", help="hold out the last 5000 train images; no test eval")
    return p.parse_args(argv)


def build_model(args: argparse.Namespace) -> ViTForImageClassification:
    config = ViTConfig(
        image_size=28,
        patch_size=4,
        num_channels=1,
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        intermediate_size=args.mlp_ratio * args.hidden,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=len(fmnist.CLASSES),
        id2label=dict(enumerate(fmnist.CLASSES)),
        label2id={name: i for i, name in enumerate(fmnist.CLASSES)},
        attn_implementation="sdpa",
    )
    return ViTForImageClassification(config)


def augment(images: torch.Tensor, gen: torch.Generator, pad: int = 2, flip_p: float = 0.5) -> torch.Tensor:
    """Random 28x28 crop of the `pad`-px zero-padded image, and a horizontal flip with probability `flip_p`
    (uint8 in/out)."""
    n = images.shape[0]
    padded = F.pad(images, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    flip = torch.rand(n, generator=gen) < flip_p
    ar = torch.arange(28)
    rows = (dy[:, None] + ar)[:, :, None]
    cols = dx[:, None] + torch.where(flip[:, None], 27 - ar, ar)
    return padded[torch.arange(n)[:, None, None], rows, cols[:, None, :]]


@torch.no_grad()
def evaluate(model: ViTForImageClassification, images: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Top-1 accuracy and mean NLL (no label smoothing)."""
    model.eval()
    correct, nll = 0, 0.0
    y_all = torch.as_tensor(labels)
    for i in range(0, len(images), 1000):
        logits = model(pixel_values=fmnist.to_pixels(images[i : i + 1000])).logits
        y = y_all[i : i + 1000]
        correct += int((logits.argmax(-1) == y).sum())
        nll += float(F.cross_entropy(logits, y, reduction="sum"))
    return correct / len(images), nll / len(images)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(args.threads)

    images, labels = fmnist.load("train", args.data)
    if args.val:
        held_x, held_y = images[-VAL_SIZE:], labels[-VAL_SIZE:]
        images, labels = images[:-VAL_SIZE], labels[:-VAL_SIZE]
    train_x, train_y = torch.from_numpy(images), torch.from_numpy(labels)

    model = build_model(args)
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for name, p in model.named_parameters() if p.ndim >= 2 and "embeddings" not in name]
    no_decay = [p for name, p in model.named_parameters() if not (p.ndim >= 2 and "embeddings" not in name)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
    )
    steps_per_epoch = len(train_x) // args.batch_size  # drop the last partial batch
    total = args.epochs * steps_per_epoch
    warm = max(1, int(args.warmup * total))

    def lr_factor(s: int) -> float:
        return (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / (total - warm)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    gen = torch.Generator().manual_seed(args.seed)
    print(
        f"ViT hidden {args.hidden}, {args.layers} layers, {args.heads} heads: {n_params / 1e6:.2f}M params; "
        f"{len(train_x)} train images, {args.epochs} epochs x {steps_per_epoch} steps",
        flush=True,
    )

    start = time.perf_counter()
    marks = []
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(train_x), generator=gen)
        loss_sum, correct, seen = 0.0, 0, 0
        for step in range(steps_per_epoch):
            idx = order[step * args.batch_size : (step + 1) * args.batch_size]
            x = fmnist.to_pixels(augment(train_x[idx], gen, args.pad, args.flip))
            y = train_y[idx]
            logits = model(pixel_values=x).logits
            loss = F.cross_entropy(logits, y, label_smoothing=args.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            loss_sum += loss.item() * len(y)
            correct += int((logits.argmax(-1) == y).sum())
            seen += len(y)
        line = (
            f"epoch {epoch + 1}/{args.epochs}  train loss {loss_sum / seen:.4f}  "
            f"train acc {correct / seen:.4f}  lr {sched.get_last_lr()[0]:.2e}  "
            f"elapsed {time.perf_counter() - start:.0f}s"
        )
        marks.append(time.perf_counter() - start)
        if args.val:
            acc, nll = evaluate(model, held_x, held_y)
            line += f"  val acc {acc:.4f}  val nll {nll:.4f}"
        print(line, flush=True)
    wall = time.perf_counter() - start

    model.eval()
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out, safe_serialization=True)
    if args.val:
        print(f"done in {wall:.0f}s (validation run; test set not evaluated)", flush=True)
        return

    test_x, test_y = fmnist.load("test", args.data)
    acc, nll = evaluate(model, test_x, test_y)
    acc2k, _ = evaluate(model, test_x[:2000], test_y[:2000])
    size = (args.out / "model.safetensors").stat().st_size
    print(f"done in {wall:.0f}s  test acc {acc:.4f}  test nll {nll:.4f}  first 2000: {acc2k:.4f}", flush=True)
    command = "python scripts/train_fmnist.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    steps = [f"random 28x28 crop of the {args.pad}-px zero-padded image"] if args.pad else []
    steps += [f"horizontal flip with p {args.flip}"] if args.flip else []
    augmentation = " and ".join(steps) + " (seeded torch Generator)" if steps else "none"
    hyper = {k: v for k, v in vars(args).items() if k not in ("out", "data", "val")}
    (args.out / "TRAINING.md").write_text(
        f"""# Fashion-MNIST ViT

`ViTForImageClassification` trained from scratch by `scripts/train_fmnist.py`.

- command: `{command}`
- seed: {args.seed} (model init, data order and augmentation; `torch.use_deterministic_algorithms(True)`)
- architecture: image 28x28x1, patch 4 (49 patches + [CLS] = 50 tokens), hidden {args.hidden}, \
{args.layers} layers, {args.heads} heads, MLP {args.mlp_ratio * args.hidden}, dropout 0; \
{n_params:,} parameters, model.safetensors {size / 1e6:.2f} MB (fp32)
- hyperparameters: {", ".join(f"{k} {v}" for k, v in hyper.items())}
- optimiser: AdamW (no weight decay on biases, norms, embeddings), linear warm-up then cosine to 0, \
per step; gradient-norm clip 1.0; cross-entropy with label smoothing {args.label_smoothing}
- data: all 60,000 training images in a seeded random order each epoch; augmentation: {augmentation}; \
pixels scaled to [0, 1] and normalized with mean {fmnist.MEAN}, std {fmnist.STD}
- epochs: {args.epochs} ({args.epochs * steps_per_epoch} steps of {args.batch_size})
- wall time of the training loop: {wall:.0f} s ({wall / 60:.1f} min) on {args.threads} CPU threads, \
a machine with 2 CPU cores \
({platform.processor() or platform.machine()}) shared with other work; elapsed after each epoch: \
{", ".join(f"{m:.0f}" for m in marks)} s
- versions: Python {platform.python_version()}, torch {torch.__version__}, \
transformers {transformers.__version__}

## Result (the 10,000 test images, evaluated once)

- test top-1 accuracy: {acc:.4f}
- test NLL: {nll:.4f}
- first 2000 test images: top-1 accuracy {acc2k:.4f} (tests/test_fmnist.py checks this, less 0.5 points)
{TUNING}"""
    )


if __name__ == "__main__":
    main()
