"""`tokenfuse bench --task vlm`: visual-token operators against the full model and the baselines a user
would pick instead (`random`, `pool`, `resize`: registered operators like the others), on the packaged
VLM (tokenfuse.assets.vlm, a real `LlavaForConditionalGeneration`) answering Fashion-MNIST questions,
or on the user's model and data (`vlm_data`: any supported family through its own processor). Both run
the one measurement below; only where the prompts come from differs (`Prompts`).

Each row is one question about one image, greedy `generate()`:
- answer %: the reply equals the expected answer (case, surrounding spaces and a final full stop
  aside); agree %: the reply equals the full model's;
- KL: of the full model's next-token distribution at the first reply token to the reduced model's,
  in nats, averaged over images;
- visual: visual tokens the LLM's layers process, as a share of the full model's (layer-averaged,
  so an in-LLM operator at layer 2 counts the two layers that saw them all); tokens and FLOPs: the
  whole prefill's (tower and LLM layers), relative to the full model; the tower's from the sequences
  it ran (one per view or frame; Qwen2.5-VL's windowed layers counted as full attention);
- speedup: the prefill (one forward over the prompt, what a reduction shortens); generate: the
  end-to-end `generate()` of the reply. Both are the median of interleaved rounds (`measure`); the
  inputs are tokenized and the pixels prepared before the clock starts.

An operator the model's family refuses (resize on Qwen-VL, pool on AnyRes, [CLS]-scored operators on
SigLIP) is left out, with a note giving tokenfuse's reason; this is found before any work.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..adapters.vlm.families import family_of
from ..api import apply, patch_of, remove
from ..api.progress import progress_bar
from ..assets import vlm
from . import measure, meta, metrics, vlm_data
from .measure import Config, Pass

BASELINES = ("full",)
KEEPS = (0.5, 0.25, 0.11)
NEW_TOKENS = 4  # the packaged VLM's longest class word is 3 tokens, then <|im_end|>


@dataclass
class Prompts:
    """What a VLM bench asks: model inputs per batch, prepared (tokenized, pixels made, on the model's
    device), each row's expected answer, the tokenizer its replies are decoded with, tokens per reply."""

    data: str
    batches: list[dict[str, Tensor]]
    answers: list[str]
    tokenizer: Any
    new_tokens: int


class TowerWork:
    """The sequences the vision tower ran in its last call, read by a forward hook (after any pre-hook,
    so `resize`'s pixels): one per view of LLaVA's towers (its output's rows), one per frame of a
    Qwen-VL tower (its grid_thw)."""

    def __init__(self, model: torch.nn.Module):
        family, inner = family_of(model)
        vision = inner.config.vision_config
        self.layers = getattr(vision, "num_hidden_layers", None) or vision.depth
        self.hidden = getattr(vision, "embed_dim", None) or vision.hidden_size
        self.width = getattr(vision, "intermediate_size", None) or int(self.hidden * vision.mlp_ratio)
        self.sequences = torch.zeros(0, dtype=torch.long)
        tower = inner.get_submodule(family.tower)
        self.handle = tower.register_forward_hook(self._record, with_kwargs=True)

    def _record(self, module: torch.nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
        grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        if grid is not None:
            self.sequences = (grid[:, 1] * grid[:, 2]).repeat_interleave(grid[:, 0]).cpu()
        else:
            hidden = out[0]
            self.sequences = torch.full((hidden.shape[0],), hidden.shape[1])

    def take(self, rows: int) -> tuple[Tensor, Tensor]:
        """(layers, rows) tokens entering each tower layer and (rows,) the tower's FLOPs: the batch's,
        shared evenly by its rows (only totals are reported)."""
        n = self.sequences.numpy()
        flops = self.layers * metrics.encoder_flops(n, n, self.hidden, self.width)
        tokens = torch.full((self.layers, rows), float(n.sum()) / rows)
        return tokens, torch.full((rows,), flops / rows)


@dataclass
class VLMTask:
    """A VLM answering `prompts` (`measure.Task`); the first `timing` batches are timed."""

    model: torch.nn.Module
    prompts: Prompts
    timing: int
    name: str

    def __post_init__(self) -> None:
        self.tower = TowerWork(self.model)
        config = self.model.config
        self.n_llm = config.text_config.num_hidden_layers
        self.image_token = getattr(config, family_of(self.model)[0].placeholder)

    def run(self, config: Config, warm_up: bool = False) -> Pass:
        batches = self.prompts.batches[: 1 if warm_up else self.timing]
        prefill = self.prefill(config, batches)
        generation = self.generate(config, batches, scores=False)
        return dataclasses.replace(prefill, extra={"generation": generation.seconds})

    def quality_pass(self, config: Config, timed: Pass) -> Pass:
        return self.generate(config, self.prompts.batches, scores=True)

    def prefill(self, config: Config, batches: list[dict]) -> Pass:
        """One forward over each prompt, the last position's logits only (as generate()'s prefill)."""

        def forward(inputs: dict) -> tuple[dict[str, Tensor], Tensor]:
            self.model(**inputs, logits_to_keep=1)
            return self.trace(inputs)

        return measure.run_pass(self.model, config, config.method in BASELINES, batches, forward)

    def generate(self, config: Config, batches: list[dict], scores: bool) -> Pass:
        tokenizer, n = self.prompts.tokenizer, self.prompts.new_tokens
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

        def forward(inputs: dict) -> tuple[dict[str, Tensor], Tensor]:
            out = self.model.generate(
                **inputs,
                max_new_tokens=n,
                do_sample=False,
                output_logits=scores,
                return_dict_in_generate=True,
                pad_token_id=pad,
            )
            reply = out.sequences[:, inputs["input_ids"].shape[1] :]  # shorter if every row ended early
            outputs, trace = self.trace(inputs)
            outputs["reply"] = torch.nn.functional.pad(reply, (0, n - reply.shape[1]), value=pad)
            if scores:
                outputs["logprobs"] = torch.log_softmax(out.logits[0].float(), -1).half()
            return outputs, trace

        return measure.run_pass(self.model, config, config.method in BASELINES, batches, forward)

    def trace(self, inputs: dict) -> tuple[dict[str, Tensor], Tensor]:
        """({"tower_flops": (B,)}, (LLM layers + tower layers, 2, B)): tokens entering each layer of
        the last prefill, per row (the LLM's from the patch's trace, every real token without one)."""
        mask = inputs["attention_mask"]
        patch = patch_of(self.model)
        llm_trace = (patch.llm_trace if patch is not None else []) or [(0, mask.sum(1))]
        llm = torch.zeros(self.n_llm, mask.shape[0])
        for layer, count in llm_trace:
            llm[layer:] = count.float().cpu()
        tower, flops = self.tower.take(mask.shape[0])
        return {"tower_flops": flops}, torch.cat([llm, tower])[:, None, :].expand(-1, 2, -1)

    def flops(self, p: Pass) -> float:
        llm = metrics.decoder_flops(p.layer_tokens[:, : self.n_llm, 0], self.model.config.text_config)
        return llm + float(p.outputs["tower_flops"].sum())

    def head(self, config: Config) -> dict[str, Any]:
        return {"model": self.name}

    def columns(self, config: Config, quality: Pass, full: Pass) -> dict[str, Any]:
        replies, full_replies = self.replies(quality), self.replies(full)
        answers = self.prompts.answers
        p, q = full.outputs["logprobs"].astype(np.float64), quality.outputs["logprobs"].astype(np.float64)
        visual = self.visual_tokens(quality.layer_tokens[:, : self.n_llm, 0])
        full_visual = self.visual_tokens(full.layer_tokens[:, : self.n_llm, 0])
        return {
            "images": len(answers),
            "visual": float(visual / full_visual),
            "answer_acc": 100.0 * float(np.mean([same(r, a) for r, a in zip(replies, answers, strict=True)])),
            "agreement": 100.0 * float(np.mean([r == f for r, f in zip(replies, full_replies, strict=True)])),
            "kl": float((np.exp(p) * (p - q)).sum(-1).mean()),
        }

    def replies(self, p: Pass) -> list[str]:
        tokens = p.outputs["reply"].astype(np.int64)
        return [r.strip() for r in self.prompts.tokenizer.batch_decode(tokens, skip_special_tokens=True)]

    @cached_property
    def text_tokens(self) -> np.ndarray:
        """(inputs,) each prompt's real text tokens, which no operator removes."""
        return np.concatenate(
            [
                (b["attention_mask"].bool() & (b["input_ids"] != self.image_token)).sum(1).cpu().numpy()
                for b in self.prompts.batches
            ]
        )

    def visual_tokens(self, llm_layers: np.ndarray) -> float:
        """Visual tokens summed over rows and LLM layers: each row's tokens less its text tokens."""
        return float((llm_layers - self.text_tokens[:, None]).sum())


def same(reply: str, answer: str) -> bool:
    """Whether a reply gives the answer: equal but for case, surrounding spaces and a final full stop."""

    def normal(text: str) -> str:
        return " ".join(text.strip().rstrip(".").lower().split())

    return normal(reply) == normal(answer)


def packaged(limit: int, batch_size: int, seed: int = 0) -> tuple[torch.nn.Module, Prompts]:
    """The packaged VLM on the first `limit` Fashion-MNIST test images, a seeded question each."""
    model, tokenizer = vlm.load_vlm()
    images, labels = vlm.fmnist_test(limit)
    questions = vlm.questions_for(len(images), seed=seed)
    batches = [
        vlm.encode(tokenizer, questions[i : i + batch_size], images[i : i + batch_size]).inputs()
        for i in range(0, len(images), batch_size)
    ]
    return model, Prompts("fmnist", batches, [vlm.answer_of(int(y)) for y in labels], tokenizer, NEW_TOKENS)


def users(name: str, data: str, limit: int | None, batch_size: int) -> tuple[torch.nn.Module, Prompts]:
    """The user's model on the user's data, everything checked before the weights are loaded."""
    rows = vlm_data.read_rows(data, limit)
    vlm_data.check_family(name)
    processor = vlm_data.load_processor(name)
    images = vlm_data.load_images(rows)
    model = vlm_data.load_model(name)
    texts = [vlm_data.prompt(processor, r.question) for r in rows]
    batches = [
        vlm_data.encode(
            processor, texts[i : i + batch_size], [[x] for x in images[i : i + batch_size]], model
        )
        for i in range(0, len(rows), batch_size)
    ]
    answers = [r.answer for r in rows]
    tokenizer = processor.tokenizer
    return model, Prompts(str(data), batches, answers, tokenizer, vlm_data.new_tokens(tokenizer, answers))


def runnable(model: torch.nn.Module, configs: list[Config], name: str) -> tuple[list[Config], list[str]]:
    """The configurations the model's family takes, and a note for each operator it refuses (with
    tokenfuse's reason), found by installing each once."""
    kept, refused = [], {}
    for config in configs:
        if config.method not in BASELINES and config.method not in refused:
            try:
                apply(model, config.method, keep=config.keep, **config.options)
            except (ValueError, TypeError) as e:
                refused[config.method] = f"{config.method} left out on {name}: {e}"
            finally:
                remove(model)
        if config.method not in refused:
            kept.append(config)
    return kept, list(refused.values())


def run(
    methods: str = "all",
    keeps: tuple[float, ...] = KEEPS,
    limit: int | None = None,
    batch_size: int | None = None,
    repeats: int = 3,
    options: dict[str, Any] | None = None,
    timing_images: int = 32,
    progress: bool = True,
    model: str | None = None,
    data: str | None = None,
) -> dict[str, Any]:
    """Run the VLM bench; results as a JSON-ready dict ({"meta", "rows", "notes"}). `model` and `data`
    (a hub id or folder, a JSONL file) together: the user's; neither: the packaged VLM on 200 images."""
    if (model is None) != (data is None):
        raise ValueError(
            "--model and --data go together: the vlm bench runs the packaged VLM on Fashion-MNIST, or your "
            "model on your data (--model HUB_ID_OR_FOLDER --data FILE.jsonl)"
        )
    batch_size = 8 if batch_size is None else batch_size
    measure.check_positive(limit=limit, batch_size=batch_size, repeats=repeats)
    configs = measure.configs_for(
        measure.method_names(methods, BASELINES, kind="visual"),
        list(keeps),
        options or {},
        BASELINES,
        kind="visual",
    )
    if model is None:
        limit = 200 if limit is None else limit
        host, prompts = packaged(limit, batch_size)
    else:
        host, prompts = users(model, data, limit, batch_size)
    name = model or "fmnist-vlm"
    configs, refused = runnable(host, configs, name)
    timing = max(1, min(len(prompts.batches), -(-timing_images // batch_size)))
    task = VLMTask(host, prompts, timing, name)
    try:
        with progress_bar(progress) as bar:
            rows, notes = measure.compare(task, configs, repeats, bar)
    finally:
        task.tower.handle.remove()
    arguments = meta.arguments(
        "vlm", methods, keeps, limit, batch_size, repeats, options, models=[name], data=prompts.data
    )
    return meta.results(rows, [*refused, *notes], arguments)
