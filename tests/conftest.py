"""Tiny randomly initialised encoders built from local configs (no download), and the packaged
tokenizer of all-MiniLM-L6-v2 so that real text can be fed to them."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertModel,
    DistilBertConfig,
    DistilBertModel,
    RobertaConfig,
    RobertaModel,
)

from tokenfuse import data

ATTN = ("sdpa", "eager")


def tiny_bert(attn: str = "sdpa", layers: int = 4) -> BertModel:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        attn_implementation=attn,
    )
    return BertModel(config).eval()


def tiny_roberta(attn: str = "sdpa") -> RobertaModel:
    torch.manual_seed(0)
    config = RobertaConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=66,
        pad_token_id=0,
        attn_implementation=attn,
    )
    return RobertaModel(config).eval()


def tiny_distilbert(attn: str = "sdpa") -> DistilBertModel:
    torch.manual_seed(0)
    config = DistilBertConfig(
        vocab_size=30522,
        dim=32,
        n_layers=3,
        n_heads=4,
        hidden_dim=64,
        max_position_embeddings=64,
        attn_implementation=attn,
    )
    return DistilBertModel(config).eval()


MODELS = {"bert": tiny_bert, "roberta": tiny_roberta, "distilbert": tiny_distilbert}


@pytest.fixture(scope="session")
def tokenizer():
    return AutoTokenizer.from_pretrained(data.minilm_path(), local_files_only=True)


@pytest.fixture(scope="session")
def texts() -> list[str]:
    """Sentences of mixed lengths, so that every batch is padded."""
    return [
        "The quick brown fox jumps over the lazy dog near the river bank.",
        "Short one.",
        "Markets rallied on Tuesday as investors weighed new figures on inflation, jobs and the "
        "outlook for interest rates, while oil prices slipped for a third day.",
        "A film about a film about a film.",
        "Tokens that look alike can be merged; tokens that stand alone should be kept apart.",
    ]


@pytest.fixture(scope="session")
def minilm():
    return data.load_text_model("minilm")
