"""`tokenfuse bench --task vlm`: visual-token operators on the packaged VLM (tokenfuse.assets.vlm, a
real `LlavaForConditionalGeneration`), against the full model and the baselines a user would pick
instead (`random`, `pool`, `resize`: registered operators like the others).

Held-out Fashion-MNIST test images, one seeded question each (a batch mixes the phrasings), greedy
`generate()`:
- answer %: the reply equals the class word; agree %: the reply equals the full model's;
- KL: of the full model's next-token distribution at the first reply token to the reduced model's,
  in nats, averaged over images;
- visual: visual tokens the LLM's layers process, as a share of the full model's (layer-averaged,
  so an in-LLM operator at layer 2 counts the two layers that saw them all); tokens and FLOPs: the
  whole prefill's (tower and LLM layers), relative to the full model;
- speedup: the prefill (one forward over the prompt, what a reduction shortens); generate: the
  end-to-end `generate()` of the reply. Both are the median of interleaved rounds (`measure`); the
  inputs are tokenized and the pixels prepared before the clock starts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..api import patch_of
from ..api.progress import progress_bar
from ..assets import vlm
from . import measure, metrics
from .measure import Config, Pass

BASELINES = ("full",)
KEEPS = (0.5, 0.25, 0.11)
NEW_TOKENS = 4  # the longest class word is 3 tokens, then <|im_end|>


@dataclass
class VLMTask:
    """The packaged VLM on `limit` test images (`measure.Task`); the first `timing` are timed."""

    model: torch.nn.Module
    tokenizer: Any
    batches: list[vlm.Batch]
    labels: np.ndarray
    timing: int
    name: str = "fmnist-vlm"

    def run(self, config: Config, warm_up: bool = False) -> Pass:
        count = 1 if warm_up else self.timing
        batches = [b.inputs() for b in self.batches[:count]]
        prefill = self.prefill(config, batches)
        generation = self.generate(config, batches, scores=False)
        return dataclasses.replace(prefill, extra={"generation": generation.seconds})

    def quality_pass(self, config: Config, timed: Pass) -> Pass:
        return self.generate(config, [b.inputs() for b in self.batches], scores=True)

    def prefill(self, config: Config, batches: list[dict]) -> Pass:
        """One forward over each prompt, the last position's logits only (as generate()'s prefill)."""

        def forward(inputs: dict) -> tuple[dict[str, Tensor], Tensor]:
            self.model(**inputs, logits_to_keep=1)
            return {}, self.trace(inputs)

        return measure.run_pass(self.model, config, config.method in BASELINES, batches, forward)

    def generate(self, config: Config, batches: list[dict], scores: bool) -> Pass:
        def forward(inputs: dict) -> tuple[dict[str, Tensor], Tensor]:
            out = self.model.generate(
                **inputs,
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
                output_logits=scores,
                return_dict_in_generate=True,
                pad_token_id=self.tokenizer.pad_token_id,
            )
            reply = out.sequences[:, inputs["input_ids"].shape[1] :]  # shorter if every row ended early
            reply = torch.nn.functional.pad(
                reply, (0, NEW_TOKENS - reply.shape[1]), value=self.tokenizer.pad_token_id
            )
            outputs = {"reply": reply}
            if scores:
                outputs["logprobs"] = torch.log_softmax(out.logits[0].float(), -1).half()
            return outputs, self.trace(inputs)

        return measure.run_pass(self.model, config, config.method in BASELINES, batches, forward)

    def trace(self, inputs: dict) -> Tensor:
        """(LLM layers + tower layers, 2, B): tokens entering each layer of the last prefill, per row;
        the tower's rows hold each row's images' tokens."""
        config = self.model.config
        n_llm = config.text_config.num_hidden_layers
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        patch = patch_of(self.model)
        llm_trace = patch.llm_trace if patch is not None else []
        if not llm_trace:
            llm_trace = [(0, mask.sum(1))]
        llm = torch.zeros(n_llm, ids.shape[0])
        for layer, count in llm_trace:
            llm[layer:] = count.float()
        images = (ids == config.image_token_id).any(1)
        prefill = None if patch is None else patch.last  # the last prompt's pass (not a decoding step's)
        tower_rows = None if prefill is None else prefill.tower_trace
        if tower_rows is None:
            grid = inputs["pixel_values"].shape[-1] // config.vision_config.patch_size
            n_tower = config.vision_config.num_hidden_layers
            tower_rows = torch.full((n_tower, int(images.sum())), grid * grid + 1)
        tower = torch.zeros(tower_rows.shape[0], ids.shape[0])
        tower[:, images] = tower_rows.float()
        layers = torch.cat([llm, tower])
        return layers[:, None, :].expand(-1, 2, -1)

    def flops(self, p: Pass) -> float:
        config = self.model.config
        n_llm = config.text_config.num_hidden_layers
        llm = metrics.decoder_flops(p.layer_tokens[:, :n_llm, 0], config.text_config)
        vision = config.vision_config
        width = metrics.mlp_width(vision)
        tower = p.layer_tokens[:, n_llm:, 0]
        return llm + metrics.encoder_flops(tower, tower, vision.hidden_size, width)

    def head(self, config: Config) -> dict[str, Any]:
        return {"model": self.name}

    def columns(self, config: Config, quality: Pass, full: Pass) -> dict[str, Any]:
        replies = self.tokenizer.batch_decode(
            quality.outputs["reply"].astype(np.int64), skip_special_tokens=True
        )
        full_replies = self.tokenizer.batch_decode(
            full.outputs["reply"].astype(np.int64), skip_special_tokens=True
        )
        replies = [r.strip() for r in replies]
        answers = [vlm.answer_of(int(y)) for y in self.labels]
        p, q = full.outputs["logprobs"].astype(np.float64), quality.outputs["logprobs"].astype(np.float64)
        kl = float((np.exp(p) * (p - q)).sum(-1).mean())
        n_llm = self.model.config.text_config.num_hidden_layers
        visual = self.visual_tokens(quality.layer_tokens[:, :n_llm, 0])
        full_visual = self.visual_tokens(full.layer_tokens[:, :n_llm, 0])
        return {
            "images": len(self.labels),
            "visual": float(visual / full_visual),
            "answer_acc": 100.0 * float(np.mean([r == a for r, a in zip(replies, answers, strict=True)])),
            "agreement": 100.0
            * float(np.mean([r == f.strip() for r, f in zip(replies, full_replies, strict=True)])),
            "kl": kl,
        }

    @cached_property
    def text_tokens(self) -> np.ndarray:
        """(inputs,) each prompt's real text tokens, which no operator removes."""
        image = self.model.config.image_token_id
        return np.concatenate(
            [(b.attention_mask.bool() & (b.input_ids != image)).sum(1).numpy() for b in self.batches]
        )

    def visual_tokens(self, llm_layers: np.ndarray) -> float:
        """Visual tokens summed over rows and LLM layers: each row's tokens less its text tokens."""
        return float((llm_layers - self.text_tokens[:, None]).sum())


def task(limit: int, batch_size: int, timing_images: int, seed: int = 0) -> VLMTask:
    """The packaged VLM on the first `limit` test images, a seeded question each."""
    model, tokenizer = vlm.load_vlm()
    images, labels = vlm.fmnist_test(limit)
    questions = vlm.questions_for(len(images), seed=seed)
    batches = [
        vlm.encode(tokenizer, questions[i : i + batch_size], images[i : i + batch_size])
        for i in range(0, len(images), batch_size)
    ]
    timing = max(1, min(len(batches), -(-timing_images // batch_size)))
    return VLMTask(model, tokenizer, batches, labels, timing)


def run(
    methods: str = "all",
    keeps: tuple[float, ...] = KEEPS,
    limit: int | None = 200,
    batch_size: int | None = None,
    repeats: int = 3,
    options: dict[str, Any] | None = None,
    timing_images: int = 32,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the VLM bench; results as a JSON-ready dict ({"meta", "rows", "notes"})."""
    limit = 200 if limit is None else limit
    batch_size = 8 if batch_size is None else batch_size
    measure.check_positive(limit=limit, batch_size=batch_size, repeats=repeats)
    configs = measure.configs_for(
        measure.method_names(methods, BASELINES, kind="visual"),
        list(keeps),
        options or {},
        BASELINES,
        kind="visual",
    )
    with progress_bar(progress) as bar:
        rows, notes = measure.compare(task(limit, batch_size, timing_images), configs, repeats, bar)
    arguments = measure.arguments(
        "vlm", methods, keeps, limit, batch_size, repeats, options, models=["fmnist-vlm"], data="fmnist"
    )
    return measure.results(rows, notes, arguments)
