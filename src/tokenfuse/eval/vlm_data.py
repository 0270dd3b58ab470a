"""The VLM bench on the user's own model and data (`tokenfuse bench --task vlm --model M --data F.jsonl`):
a JSONL file of questions about images, and a vision-language model of a supported family run through
its own processor (`AutoProcessor`) and chat template.

Each line of the file is one JSON object: {"image": path, "question": text, "answer": text}, a relative
image path read from the file's folder. Everything is checked before any work: every line and image of
the file, then the model's family (its config on the meta device, through the one dispatcher), then
its processor and chat template; only then are the weights loaded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

FIELDS = ("image", "question", "answer")
FORMAT = '{"image": "cat.jpg", "question": "What animal is this?", "answer": "cat"}'
MAX_NEW_TOKENS = 64  # the longest reply generated, whatever the longest answer


@dataclass(frozen=True)
class Row:
    """One line of the data file: its number (from 1), the image's resolved path, question and answer."""

    line: int
    image: Path
    question: str
    answer: str


def read_rows(path: str | Path, limit: int | None = None) -> list[Row]:
    """The file's rows (the first `limit`), every line checked first: a malformed line or a missing
    image is named with its line number, before any model is loaded."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--data {path}: no such file; give a JSONL file, one {FORMAT} per line")
    rows = []
    for number, text in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not text.strip():
            continue
        where = f"{path} line {number}"
        try:
            item = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where} is not JSON ({e.msg}); each line is one object: {FORMAT}") from None
        if not isinstance(item, dict):
            raise ValueError(f"{where} is a JSON {type(item).__name__}, not an object: {FORMAT}")
        missing = [f for f in FIELDS if not isinstance(item.get(f), str) or not item[f].strip()]
        if missing:
            raise ValueError(
                f"{where} has no {', '.join(repr(f) for f in missing)} (a non-empty string); "
                f"each line needs image, question and answer: {FORMAT}"
            )
        image = Path(item["image"]).expanduser()
        image = image if image.is_absolute() else path.parent / image
        if not image.is_file():
            raise ValueError(
                f"{where}: image {item['image']} not found (looked for {image}; a relative path is read "
                f"from the data file's folder)"
            )
        rows.append(Row(number, image, item["question"], item["answer"]))
    if not rows:
        raise ValueError(f"--data {path} holds no rows; give one {FORMAT} per line")
    return rows if limit is None else rows[:limit]


def load_images(rows: list[Row]) -> list[Any]:
    """Each row's image as RGB (PIL); an unreadable file is named with its line."""
    from PIL import Image, UnidentifiedImageError

    images = []
    for row in rows:
        try:
            with Image.open(row.image) as image:
                images.append(image.convert("RGB"))
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"line {row.line}: {row.image} could not be read as an image ({e})") from None
    return images


def check_family(name: str) -> None:
    """Refuse a model tokenfuse cannot reduce from its config alone (a meta-device skeleton given to the
    one dispatcher, `adapters.target`), before its weights are loaded."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    from ..adapters import families, target

    config = AutoConfig.from_pretrained(name)
    try:
        with torch.device("meta"):
            skeleton = AutoModelForImageTextToText.from_config(config)
    except ValueError:
        raise ValueError(
            f"--model {name} is a {config.model_type!r} model, not a vision-language model transformers "
            f"can generate with; the vlm bench runs: {', '.join(families.supported())}"
        ) from None
    kind = target(skeleton)  # the dispatcher's message for a family tokenfuse does not support
    if kind != "vlm":
        raise ValueError(f"--model {name} is a {kind} model; the vlm bench runs vision-language models")


def load_processor(name: str) -> Any:
    """The model's own processor, left-padding (generation appends on the right), with a chat template."""
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(name)
    except (ImportError, AttributeError, TypeError) as e:
        raise ValueError(
            f"the processor of {name} could not be loaded ({e}); the Qwen-VL and LLaVA-OneVision processors "
            "need torchvision for their video part: pip install torchvision"
        ) from None
    if getattr(processor, "chat_template", None) is None:
        raise ValueError(
            f"the processor of {name} has no chat template; add one (chat_template.jinja in the folder)"
        )
    processor.tokenizer.padding_side = "left"
    return processor


def load_model(name: str, device: str | None = None, dtype: str | None = None) -> torch.nn.Module:
    """The weights, in eval mode, on `device` (the GPU where there is one, else the CPU) in `dtype` (a
    torch dtype's name or "auto": the checkpoint's; by default the checkpoint's on a GPU, fp32 on the CPU)."""
    from transformers import AutoModelForImageTextToText
    from transformers.utils import logging

    logging.disable_progress_bar()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    chosen = torch_dtype(dtype) if dtype is not None else None
    if chosen is None:
        chosen = "auto" if torch.device(device).type == "cuda" else torch.float32
    model = AutoModelForImageTextToText.from_pretrained(name, dtype=chosen)
    return model.to(device).eval()


def torch_dtype(name: str) -> torch.dtype | str:
    """A dtype given by name ("bfloat16", "float16", "float32" or "auto"), checked before any loading."""
    if name == "auto":
        return name
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(
            f"dtype={name!r} is not a floating-point torch dtype: give bfloat16, float16, float32 or auto"
        )
    return dtype


def prompt(processor: Any, question: str, images: int = 1) -> str:
    """The chat template's text for one user turn, the question after its images, with the generation
    prompt after it."""
    content = [*({"type": "image"} for _ in range(images)), {"type": "text", "text": question}]
    return processor.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
    )


def encode(
    processor: Any, texts: list[str], images: list[list[Any]], model: torch.nn.Module
) -> dict[str, Tensor]:
    """One batch of prompts (`prompt`) and each one's images through the processor, padded; on the
    model's device, pixels in its dtype."""
    flat = [image for row in images for image in row]
    batch = processor(text=texts, images=flat or None, padding=True, return_tensors="pt")
    parameter = next(model.parameters())
    return {
        k: v.to(parameter.device, dtype=parameter.dtype if v.is_floating_point() else v.dtype)
        for k, v in batch.items()
        if isinstance(v, Tensor)
    }


def new_tokens(tokenizer: Any, answers: list[str]) -> int:
    """Tokens generated per reply: the longest answer's and one to end it (at most MAX_NEW_TOKENS)."""
    longest = max(len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers)
    return min(longest + 1, MAX_NEW_TOKENS)
