"""The Hugging Face text encoder families `hf_text.TextPatch` serves, as data: where each keeps its
embeddings, layers and attention projections, and what its layers take that follows the tokens'
positions (MPNet's position bias, ModernBERT's rotary angles). A new BERT-like family is a few lines.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class Family:
    """Where one family of encoders keeps its embeddings and layers, the block after which tokens
    are reduced (its output is what the MLP consumes) and the query, key, value projections.
    position_bias: the layers' argument that carries a relative position bias shared by every
    layer (MPNet), computed by the host for the unreduced input; None where positions are added
    once, at the embeddings. rotary: the layers' argument that carries the rotary (cos, sin) of the
    unreduced input's positions (ModernBERT), whose layers of `config.layer_types`
    'sliding_attention' attend within `config.sliding_window` positions either side.
    merge_after "": the layer adds the attention's residual inside its own forward, out of a hook's
    reach, so tokens are reduced after the whole layer (see `TextPatch`)."""

    name: str
    model_types: tuple[str, ...]
    embeddings: str
    layers: str
    merge_after: str
    qkv: tuple[str, str, str]
    has_cls: bool = True  # position 0 is a [CLS]-like summary token
    position_bias: str | None = None
    rotary: str | None = None


FAMILIES = (
    Family(
        "bert",
        ("bert", "roberta", "xlm-roberta"),
        embeddings="embeddings",
        layers="encoder.layer",
        merge_after="attention",
        qkv=("attention.self.query", "attention.self.key", "attention.self.value"),
    ),
    Family(
        "distilbert",
        ("distilbert",),
        embeddings="embeddings",
        layers="transformer.layer",
        merge_after="sa_layer_norm",
        qkv=("attention.q_lin", "attention.k_lin", "attention.v_lin"),
    ),
    Family(
        "mpnet",
        ("mpnet",),
        embeddings="embeddings",
        layers="encoder.layer",
        merge_after="attention",
        qkv=("attention.attn.q", "attention.attn.k", "attention.attn.v"),
        position_bias="position_bias",
    ),
    Family(
        "modernbert",
        ("modernbert",),
        embeddings="embeddings",
        layers="layers",
        merge_after="",
        qkv=("attn.Wqkv",),
        rotary="position_embeddings",
    ),
)


def family_of(model: nn.Module) -> Family | None:
    """The family of a Hugging Face text model; None for anything else, wrappers that expose the
    model's config (a SentenceTransformer) included."""
    if getattr(model, "base_model", None) is None:
        return None
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return next((f for f in FAMILIES if model_type in f.model_types), None)


def supported() -> list[str]:
    return [t for f in FAMILIES for t in f.model_types]
