"""`tokenfuse bench --task vlm-speed`: the prefill speed of the visual-token operators on the real
shapes of Qwen2-VL-2B (`QWEN2_VL_2B`, its published config.json written out: no download), with random
weights, so only speed is measured here; what the operators cost in answers is measured on trained
models (`bench --task vlm`).

One image of `image_size` x `image_size` pixels (448: 32 x 32 patches, 1024 tokens in the tower,
256 after the 2 x 2 merger) and a short prompt around it (`PREFIX` text tokens before the image,
`QUESTION` after), batch 1. The clock covers one forward over the prompt (tower, merger, LLM, the
last position's logits only, as generate()'s prefill), inputs built beforehand; the median of
interleaved rounds (`measure.timings`). Boundary operators reduce the merger's output, so the tower
always runs in full; FastV reduces inside the LLM from its layer (default 2).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

from ..api import apply, patch_of, remove
from ..api.progress import progress_bar
from . import measure, meta, metrics, runtime
from .measure import Config, Pass

BASELINES = ("full",)
METHODS = "random,pool,aim,divprune,cdpruner,fastv"  # the operators Qwen2-VL takes, FastV in the LLM
KEEPS = (0.25, 0.11)
IMAGE_SIZE = 448
PREFIX, QUESTION = 20, 12  # a chat template's system and user lines; a short question and the reply's start

#: Qwen/Qwen2-VL-2B-Instruct's config.json (transformers 5 names: rope_parameters for rope_scaling)
QWEN2_VL_2B = dict(
    text_config=dict(
        vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
        num_attention_heads=12, num_key_value_heads=2, hidden_act="silu", max_position_embeddings=32768,
        rms_norm_eps=1e-6, use_sliding_window=False, sliding_window=32768, max_window_layers=28,
        bos_token_id=151643, eos_token_id=151645,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
    ),
    vision_config=dict(
        depth=32, embed_dim=1280, hidden_size=1536, hidden_act="quick_gelu", mlp_ratio=4, num_heads=16,
        in_channels=3, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
    ),
    image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653,
    tie_word_embeddings=True,
)  # fmt: skip


def qwen2_vl_2b() -> Qwen2VLConfig:
    """Qwen2-VL-2B's configuration, SDPA attention."""
    config = Qwen2VLConfig(**QWEN2_VL_2B)
    config._attn_implementation = "sdpa"
    return config


def prompt(config: Qwen2VLConfig, image_size: int, dtype: torch.dtype, seed: int = 0) -> dict[str, Tensor]:
    """The processor's output for one image of `image_size` px and a short prompt: text ids drawn
    below the special tokens, the image's flattened patches drawn from a normal distribution."""
    vision = config.vision_config
    step = vision.patch_size * vision.spatial_merge_size
    if image_size < step or image_size % step:
        raise ValueError(
            f"--image-size {image_size}: this model reads an image in cells of {step} px (patches of "
            f"{vision.patch_size} px, merged {vision.spatial_merge_size} x {vision.spatial_merge_size}); "
            f"give a multiple of {step}, e.g. {max(step, image_size // step * step)}"
        )
    gen = torch.Generator().manual_seed(seed)
    side = image_size // vision.patch_size
    visual = side * side // vision.spatial_merge_size**2
    special = min(config.image_token_id, config.video_token_id, config.vision_start_token_id)
    text = torch.randint(3, special, (PREFIX + QUESTION,), generator=gen)
    image = [config.vision_start_token_id, *[config.image_token_id] * visual, config.vision_end_token_id]
    ids = torch.cat([text[:PREFIX], torch.tensor(image), text[PREFIX:]])[None]
    width = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "mm_token_type_ids": (ids == config.image_token_id).int(),
        "pixel_values": torch.randn(side * side, width, generator=gen).to(dtype),
        "image_grid_thw": torch.tensor([[1, side, side]]),
    }


@dataclass
class SpeedTask:
    """One prompt's prefill on a randomly initialised Qwen2-VL (`measure.Task`): speed and work only."""

    model: nn.Module
    inputs: dict[str, Tensor]
    name: str = "qwen2-vl-2b"

    def run(self, config: Config, warm_up: bool = False) -> Pass:
        return measure.run_pass(self.model, config, config.method in BASELINES, [self.inputs], self.forward)

    def forward(self, inputs: dict[str, Tensor]) -> tuple[dict[str, Tensor], Tensor]:
        self.model(**inputs, logits_to_keep=1)
        return {}, self.trace()

    def trace(self) -> Tensor:
        """(LLM layers + tower layers, 2, 1): tokens entering each layer of the prefill just run."""
        config = self.model.config
        patch = patch_of(self.model)
        if patch is not None:
            llm = patch.layer_tokens().float()
        else:
            llm = torch.full(
                (config.text_config.num_hidden_layers, 2, 1), float(self.inputs["input_ids"].shape[1])
            )
        tower = torch.full((config.vision_config.depth, 2, 1), float(self.patches))
        return torch.cat([llm, tower])

    @property
    def patches(self) -> int:
        return int(self.inputs["image_grid_thw"].prod())

    def quality_pass(self, config: Config, timed: Pass) -> Pass:
        return timed  # random weights: no quality to read

    def flops(self, p: Pass) -> float:
        """The LLM's and the tower's layers (the merger and the head, about 1%, left out)."""
        config = self.model.config
        n_llm = config.text_config.num_hidden_layers
        vision = config.vision_config
        tower = p.layer_tokens[:, n_llm:, 0]
        llm = metrics.decoder_flops(p.layer_tokens[:, :n_llm, 0], config.text_config)
        return llm + metrics.encoder_flops(
            tower, tower, vision.embed_dim, vision.embed_dim * vision.mlp_ratio
        )

    def head(self, config: Config) -> dict[str, Any]:
        return {"model": self.name}

    def columns(self, config: Config, quality: Pass, full: Pass) -> dict[str, Any]:
        n_llm = self.model.config.text_config.num_hidden_layers
        text = PREFIX + QUESTION + 2  # and the image's start and end tokens

        def visual(p: Pass) -> float:
            return float((p.layer_tokens[:, :n_llm, 0] - text).sum())

        return {"visual": visual(quality) / visual(full)}


def run(
    methods: str = METHODS,
    keeps: tuple[float, ...] = KEEPS,
    image_size: int = IMAGE_SIZE,
    repeats: int = 3,
    dtype: str = "float32",
    config: Qwen2VLConfig | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the speed bench; results as a JSON-ready dict ({"meta", "rows", "notes"}). `config`: another
    Qwen2-VL configuration than `QWEN2_VL_2B` (tests run a tiny one)."""
    measure.check_positive(repeats=repeats)
    runtime.check_dtype(dtype)
    config = qwen2_vl_2b() if config is None else config
    inputs = prompt(config, image_size, runtime.DTYPES[dtype])
    names = measure.method_names(methods, BASELINES, kind="visual")
    configs = measure.configs_for(names, list(keeps), {}, BASELINES, kind="visual")
    model = runtime.random_model(Qwen2VLForConditionalGeneration, config, dtype)
    for c in configs[1:]:  # an operator this model refuses fails now, not after the first round
        apply(model, c.method, keep=c.keep)
        remove(model)
    with progress_bar(progress) as bar:
        rows, notes = measure.compare(SpeedTask(model, inputs), configs, repeats, bar)
    visual = int((inputs["input_ids"] == config.image_token_id).sum())
    shape = dict(image_size=image_size, dtype=dtype, patches=int(inputs["image_grid_thw"].prod()))
    shape |= dict(visual_tokens=visual, text_tokens=int(inputs["input_ids"].shape[1]) - visual)
    arguments = meta.arguments(
        "vlm-speed", methods, keeps, None, 1, repeats, None, model="qwen2-vl-2b", weights="random", **shape
    )
    return meta.results(rows, notes, arguments)
