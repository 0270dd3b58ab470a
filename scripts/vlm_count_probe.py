"""Does the packaged VLM read an image worse because it holds fewer tokens, or because of which tokens?

A diagnostic for the VLM bench (README, "Vision-language models"), not part of the library. On the
first `--limit` Fashion-MNIST test images, with the bench's questions and greedy decoding, the
answer accuracy of:
- full: the 144 visual tokens;
- pool k: the 12 x 12 patch grid average-pooled k x k before the projector ((12 / k)^2 tokens, the
  `pool` baseline);
- repeat k: the same pooled features, each repeated k x k times back to 144 tokens: no information
  added, only the count and the positions restored;
- proportional k: pool k, with log(k^2) added to every pooled token's attention logit in every LLM
  layer (the attention k^2 identical copies would get), prompt and decoding alike.

    python scripts/vlm_count_probe.py --limit 200
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F

from tokenfuse.assets import vlm

BATCH = 8


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--limit", type=int, default=200, help="test images")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = vlm.load_vlm()
    images, labels = vlm.fmnist_test(args.limit)
    questions = vlm.questions_for(len(images))
    answers = [vlm.answer_of(int(y)) for y in labels]
    probe = Probe(model)

    def accuracy(mode: str, k: int = 1) -> float:
        probe.mode, probe.k = mode, k
        per_image = vlm.GRID * vlm.GRID if mode in ("full", "repeat") else (vlm.GRID // k) ** 2
        right = 0
        for i in range(0, len(images), BATCH):
            batch = vlm.encode(
                tokenizer, questions[i : i + BATCH], images[i : i + BATCH], tokens_per_image=per_image
            )
            probe.image = batch.input_ids == model.config.image_token_id
            out = model.generate(
                **batch.inputs(), max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )
            replies = tokenizer.batch_decode(out[:, batch.input_ids.shape[1] :], skip_special_tokens=True)
            right += sum(r.strip() == a for r, a in zip(replies, answers[i : i + BATCH], strict=True))
        return 100.0 * right / len(images)

    print(f"full ({vlm.GRID * vlm.GRID} tokens): {accuracy('full'):.1f}%")
    for k in (2, 3):
        n = (vlm.GRID // k) ** 2
        print(
            f"k={k} ({n} tokens): pool {accuracy('pool', k):.1f}%, repeat {accuracy('repeat', k):.1f}%, "
            f"proportional {accuracy('proportional', k):.1f}%"
        )


class Probe:
    """Hooks on the projector (pooling, repeating) and on each decoder layer (the log-size bias)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.mode, self.k, self.image = "full", 1, None
        model.model.multi_modal_projector.register_forward_pre_hook(self.features)
        for layer in model.model.language_model.layers:
            layer.register_forward_pre_hook(self.bias, with_kwargs=True)

    def features(self, module: torch.nn.Module, args: tuple) -> tuple | None:
        """(B, 144, C) selected tower features -> pooled, or pooled and repeated back to the grid."""
        if self.mode == "full":
            return None
        x = args[0]
        B, N, C = x.shape
        grid = x.view(B, vlm.GRID, vlm.GRID, C).permute(0, 3, 1, 2)
        pooled = F.avg_pool2d(grid, self.k)
        if self.mode == "repeat":
            pooled = F.interpolate(pooled, size=(vlm.GRID, vlm.GRID), mode="nearest")
        return (pooled.flatten(2).transpose(1, 2),)

    def bias(self, layer: torch.nn.Module, args: tuple, kwargs: dict) -> tuple | None:
        """The layer's mask as an additive one, log(k^2) on the prompt's visual keys."""
        if self.mode != "proportional":
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        B, q = hidden.shape[:2]
        mask = kwargs.get("attention_mask")
        if mask is None:  # no padding: the host attends causally
            length = kwargs["cache"].get_seq_length(layer.self_attn.layer_idx) + q if q == 1 else q
            mask = (
                torch.ones(q, length, dtype=torch.bool).tril(length - q)[None, None].expand(B, 1, q, length)
            )
        elif mask.dtype != torch.bool:  # eager attention: additive, 0 attends
            mask = mask == 0
        columns = torch.zeros(B, mask.shape[-1])
        prompt = min(self.image.shape[1], mask.shape[-1])
        columns[:, :prompt] = self.image[:, :prompt] * math.log(self.k**2)
        kwargs["attention_mask"] = torch.where(
            mask, columns[:, None, None, :], torch.finfo(torch.float32).min
        )
        return args, kwargs


if __name__ == "__main__":
    main()
