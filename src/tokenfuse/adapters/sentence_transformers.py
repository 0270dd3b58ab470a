"""sentence-transformers models: a `SentenceTransformer` whose first module is a `Transformer`
wrapping a Hugging Face encoder of a supported family, followed by a `Pooling` module.

The encoder inside gets the ordinary text patch (`hf_text.TextPatch`, installed by the api as on any
encoder, so that `tokenfuse.embed` works on it too). This adapter adds two hooks on the `Transformer`
module so that sentence-transformers' own `Pooling` pools the reduced tokens as `api.text.pool` does:
  - before it runs: refuse a prompt that the Pooling is told to leave out (include_prompt=False), and
    note this thread's last encoder forward, to check that the encoder's patch ran;
  - after it runs: `features["attention_mask"]` becomes the token sizes (B, N) of this thread's encoder
    forward (real tokens first once reduced; float, since a token may be spread over several). Pooling
    multiplies the tokens by the mask and divides by its sum, so mean and mean_sqrt_len_tokens weigh
    each token by the inputs it stands for, and max skips padding. Pooling finds the [CLS] token by the
    mask's argmax, a merged token once sizes exceed 1, but takes `features["cls_token_embeddings"]`
    as given: that becomes the first real token (every adapter keeps [CLS] first and unmerged).
While no token was reduced the sizes equal the mask, so the embedding is bit-identical to the
unpatched model's. Modes that read positions, weightedmean (weights by position) and lasttoken
(found by the mask's maximum from the end), cannot run on merged tokens and are refused at apply.

sentence-transformers is never imported: its modules are recognised by their class names.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor, nn

from . import text_families
from .engine import Patch
from .hooks import Hooks, argument
from .protocol import no_kept

#: Pooling modes that read token positions, which merged tokens no longer have
POSITIONAL = {
    "weightedmean": "weights each token by its position",
    "lasttoken": "finds the last token by the maximum of the mask from the end, a merged token once "
    "sizes exceed 1",
}


def _is(obj: object, name: str) -> bool:
    return any(c.__name__ == name for c in type(obj).__mro__)


def encoder_of(model: nn.Module) -> nn.Module | None:
    """The Hugging Face encoder inside a SentenceTransformer; None for any other model. A
    SentenceTransformer this adapter cannot serve is refused here, before anything is patched."""
    if not _is(model, "SentenceTransformer"):
        return None
    first = model[0] if len(model) else None
    encoder = getattr(first, "auto_model", None)
    if not _is(first, "Transformer") or not isinstance(encoder, nn.Module):
        raise TypeError(
            f"tokenfuse patches a SentenceTransformer whose first module is a sentence-transformers "
            f"Transformer, and this one's is a {type(first).__name__}"
        )
    if text_families.family_of(encoder) is None:
        kind = getattr(getattr(encoder, "config", None), "model_type", None) or type(encoder).__name__
        raise TypeError(
            f"this SentenceTransformer wraps a {kind!r} model; tokenfuse supports "
            f"{', '.join(text_families.supported())} encoders"
        )
    _check_output(first)
    _check_pooling(model[1] if len(model) > 1 else None)
    return encoder


def _check_output(transformer: nn.Module) -> None:
    """The Transformer must hand Pooling the encoder's last hidden state as `token_embeddings`."""
    modalities = getattr(transformer, "modality_config", None)
    if modalities is None:  # sentence-transformers 5: forward() hands on the encoder's first output
        return
    text = modalities.get("text") or {}
    found = (text.get("method"), tuple(_names(text.get("method_output_name"))))
    into = getattr(transformer, "module_output_name", None)
    if found != ("forward", ("last_hidden_state",)) or into != "token_embeddings":
        raise ValueError(
            f"this SentenceTransformer's Transformer hands {'.'.join(found[1]) or 'nothing'} of the "
            f"encoder's {found[0]}() on as {into!r}; tokenfuse reduces the tokens of the encoder's "
            "forward(), whose last_hidden_state Pooling must read as token_embeddings"
        )


def _names(value: str | tuple | list | None) -> list[str]:
    return [value] if isinstance(value, str) else list(value or ())


def _check_pooling(pooling: nn.Module | None) -> None:
    if not _is(pooling, "Pooling"):
        raise ValueError(
            f"this SentenceTransformer's second module is {type(pooling).__name__}, not a Pooling: "
            "tokenfuse makes sentence-transformers' Pooling weigh the reduced tokens by their sizes, and "
            "any other module would read each merged token as one; load the encoder with transformers' "
            "AutoModel and embed with tokenfuse.embed"
        )
    refused = [mode for mode in modes_of(pooling) if mode in POSITIONAL]
    if refused:
        why = "; ".join(f"{mode} {POSITIONAL[mode]}" for mode in refused)
        raise ValueError(
            f"this SentenceTransformer pools by {' + '.join(modes_of(pooling))}, and merged tokens have no "
            f"position: {why}. Reduce a model pooled by mean, cls, max or mean_sqrt_len_tokens, or for "
            "lasttoken load the encoder with AutoModel and embed with tokenfuse.embed(..., "
            "pooling='lasttoken'), which reads the last real token (kept unmerged)"
        )


def modes_of(pooling: nn.Module) -> list[str]:
    """A Pooling module's modes: `pooling_mode` (sentence-transformers >= 6), else its mode string."""
    mode = getattr(pooling, "pooling_mode", None)
    return _names(mode) if mode is not None else pooling.get_pooling_mode_str().split("+")


class SentencePatch(Hooks):
    """The hooks on a SentenceTransformer's `Transformer` module, over `encoder`, the patch of the
    encoder inside it. tokens, method, layer_tokens(), decide_seconds, overhead_seconds: the encoder
    patch's."""

    def __init__(self, model: nn.Module, encoder: Patch):
        # Hooks.__init__ is not called: the timers are the encoder patch's (decide_seconds, overhead_seconds)
        self._handles = []
        self._new_slots()
        self.model = model
        self.encoder = encoder
        transformer, pooling = model[0], model[1]
        self.cls = "cls" in modes_of(pooling)
        self.prompt_excluded = not getattr(pooling, "include_prompt", True)
        self.before(transformer, self._before, kwargs=True, first=False)
        self.after(transformer, self._sizes, first=False)

    @property
    def method(self):
        return self.encoder.method

    @property
    def tokens(self):
        return self.encoder.tokens

    @property
    def decide_seconds(self) -> float:
        return self.encoder.decide_seconds

    @property
    def overhead_seconds(self) -> float:
        return self.encoder.overhead_seconds

    def layer_tokens(self) -> Tensor:
        return self.encoder.layer_tokens()

    def kept(self) -> list[Tensor]:
        raise no_kept("SentenceTransformer's token method")

    def _timer(self, hook) -> partial:
        """These hooks' time counts in the encoder patch's overhead_seconds."""
        return self.encoder._timer(hook)

    def remove(self) -> None:
        super().remove()
        self.encoder.remove()

    def _before(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        features = argument(args, kwargs, "features", 0)
        if self.prompt_excluded and "prompt_length" in features:
            raise ValueError(
                "this SentenceTransformer's Pooling leaves the prompt's tokens out (include_prompt=False), "
                "and reduced tokens may hold prompt and text merged: encode without a prompt, or remove "
                "the reduction (tokenfuse.remove) for prompted inputs"
            )
        self._local.before = self.encoder.last

    def _sizes(self, module: nn.Module, args: tuple, features: dict) -> None:
        fwd = self.encoder.last
        tokens = features["token_embeddings"]
        if fwd is None or fwd is getattr(self._local, "before", None) or fwd.tokens is None:
            raise RuntimeError(
                "the encoder inside this SentenceTransformer ran without its tokenfuse patch (removed or "
                "replaced on the encoder itself): apply the method to the SentenceTransformer again"
            )
        size = fwd.tokens.size
        if tokens.shape[:2] != size.shape:
            raise RuntimeError(
                f"the Transformer's token_embeddings {tuple(tokens.shape)} are not the tokens of the "
                f"encoder's patched forward {tuple(size.shape)}"
            )
        features["attention_mask"] = size
        if self.cls:
            first = (size > 0).int().argmax(1)
            features["cls_token_embeddings"] = tokens[torch.arange(len(tokens), device=tokens.device), first]
