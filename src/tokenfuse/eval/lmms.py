"""`lmms-eval --model tokenfuse --model_args pretrained=M,method=divprune,keep=0.25 --tasks ...`: a
vision-language model of any supported family, reduced by a visual-token operator, on lmms-eval's tasks.

lmms-eval (`pip install "tokenfuse[lmms]"`) finds this model through the entry point group
`lmms_eval.models` (pyproject.toml), so the plain command line works on an installed tokenfuse. The
model is loaded as the VLM bench loads it (`vlm_data`: the family checked from its config, its own
processor and chat template, then the weights) and reduced with `tokenfuse.apply`; `method=full` runs it
unreduced, for the baseline under the same prompting. Each request is one user turn: its images, then
the task's text (an `<image>` placeholder in that text is dropped: the chat template places the
images). Requests are batched (`batch_size`, left padding) and grouped by generation settings.

model_args: pretrained (hub id or folder), method (a visual-token operator, or full), keep, any option
of the operator (e.g. layer=2 for fastv), device, dtype (bfloat16, float16, float32, auto). One process:
lmms-eval's multi-GPU launch (accelerate) is not supported.
"""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Any

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from lmms_eval.models.registry_v2 import ModelManifest
from PIL import Image

from ..api import apply
from ..methods import make
from . import vlm_data

PLACEHOLDER = "<image>"
MAX_NEW_TOKENS = 128  # a reply's length when the task gives none


def manifest() -> ModelManifest:
    """What lmms-eval's registry loads from the entry point: `--model tokenfuse` is `TokenFuse`."""
    return ModelManifest(model_id="tokenfuse", simple_class_path=f"{__name__}.TokenFuse")


class TokenFuse(lmms):
    """A reduced VLM answering lmms-eval's requests (generate_until, loglikelihood)."""

    def __init__(
        self,
        pretrained: str,
        method: str | None = None,
        keep: float | None = None,
        device: str | None = None,
        dtype: str | None = None,
        batch_size: int | str = 1,
        max_batch_size: int | None = None,  # lmms-eval passes it for batch_size=auto, which is refused
        **options: Any,
    ) -> None:
        super().__init__()
        if method is None:
            raise ValueError(
                "give method= in --model_args: a visual-token operator (e.g. method=divprune,keep=0.25; "
                "`tokenfuse methods --visual` lists them), or method=full for the unreduced model"
            )
        operator = None
        if method == "full":
            if keep is not None or options:
                raise ValueError("method=full runs the unreduced model: give no keep or operator options")
        else:  # the operator, its keep and options checked before anything is loaded
            operator = make(method, kind="visual", **({} if keep is None else {"keep": keep}), **options)
        if not str(batch_size).isdigit() or int(batch_size) < 1:
            raise ValueError(f"batch_size must be a positive whole number, got {batch_size!r}")
        if dtype is not None:
            vlm_data.torch_dtype(dtype)
        self.batch_size = int(batch_size)
        vlm_data.check_family(pretrained)
        self.processor = vlm_data.load_processor(pretrained)
        self.model = vlm_data.load_model(pretrained, device, dtype)
        if operator is not None:
            apply(self.model, operator)  # a family that refuses the operator says so here
        tokenizer = self.processor.tokenizer
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Each request's reply: greedy unless the task samples, cut at the task's first stop string."""
        replies: list[str] = [""] * len(requests)
        groups: dict[str, list[int]] = defaultdict(list)
        for i, request in enumerate(requests):
            groups[json.dumps(request.args[1], sort_keys=True, default=str)].append(i)
        for indices in groups.values():
            settings = dict(requests[indices[0]].args[1])
            until = settings.pop("until", [])
            until = [until] if isinstance(until, str) else list(until)
            for start in range(0, len(indices), self.batch_size):
                batch = indices[start : start + self.batch_size]
                texts, images = self._prompts([requests[i] for i in batch])
                for i, reply in zip(batch, self._generate(texts, images, settings), strict=True):
                    replies[i] = min((reply.split(stop)[0] for stop in until if stop), key=len, default=reply)
        return replies

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """Each continuation's log-probability after its prompt (the reply's first tokens, as the chat
        template opens it), and whether greedy decoding would give it."""
        results = []
        tokenizer = self.processor.tokenizer
        for start in range(0, len(requests), self.batch_size):
            batch = requests[start : start + self.batch_size]
            prompts, images = self._prompts(batch)
            continuations = [c(self._doc(r)) if callable(c := r.args[1]) else c for r in batch]
            texts = [p + c for p, c in zip(prompts, continuations, strict=True)]
            lengths = [
                len(tokenizer(t)["input_ids"]) - len(tokenizer(p)["input_ids"])
                for t, p in zip(texts, prompts, strict=True)
            ]
            inputs = vlm_data.encode(self.processor, texts, images, self.model)
            with torch.inference_mode():
                logits = self.model(**inputs).logits.float()
            ids = inputs["input_ids"]
            for row, n in enumerate(lengths):  # left padding: every continuation ends its row
                if n < 1:
                    raise ValueError(f"the continuation {continuations[row]!r} adds no token to its prompt")
                scores = torch.log_softmax(logits[row, -n - 1 : -1], -1)
                target = ids[row, -n:]
                total = scores.gather(1, target[:, None]).sum()
                results.append((float(total), bool((scores.argmax(-1) == target).all())))
        return results

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError(
            "tokenfuse's lmms-eval model answers single-round tasks (generate_until, loglikelihood); "
            "multi-round tasks are not supported"
        )

    def _prompts(self, requests: list[Instance]) -> tuple[list[str], list[list[Any]]]:
        """Each request's prompt (its images, then its text, in the chat template) and its images."""
        texts, images = [], []
        for request in requests:
            context, doc_to_visual = request.args[0], request.args[2]
            visuals = [
                v for v in (doc_to_visual(self._doc(request)) if doc_to_visual else []) if v is not None
            ]
            if other := [type(v).__name__ for v in visuals if not isinstance(v, Image.Image)]:
                raise ValueError(
                    f"task {request.args[4]} gives {other[0]} visuals; tokenfuse's lmms-eval model reads "
                    "images (PIL), not videos or audio: run an image task"
                )
            texts.append(
                vlm_data.prompt(self.processor, context.replace(PLACEHOLDER, "").strip(), len(visuals))
            )
            images.append([v.convert("RGB") for v in visuals])
        return texts, images

    def _doc(self, request: Instance) -> Any:
        """The task document a request is about (lmms-eval hands the model its datasets)."""
        task, split, doc_id = request.args[4], request.args[5], request.args[3]
        return self.task_dict[task][split][doc_id]

    def _generate(self, texts: list[str], images: list[list[Any]], settings: dict[str, Any]) -> list[str]:
        inputs = vlm_data.encode(self.processor, texts, images, self.model)
        temperature = float(settings.get("temperature") or 0)
        sample = bool(settings.get("do_sample")) or temperature > 0
        sampling = {"temperature": temperature or 1.0, "top_p": settings.get("top_p")} if sample else {}
        with torch.inference_mode():
            out = self.model.generate(
                **inputs,
                max_new_tokens=int(settings.get("max_new_tokens") or MAX_NEW_TOKENS),
                do_sample=sample,
                num_beams=int(settings.get("num_beams") or 1),
                pad_token_id=self.pad,
                **sampling,
            )
        reply = out[:, inputs["input_ids"].shape[1] :]
        return self.processor.tokenizer.batch_decode(reply, skip_special_tokens=True)
