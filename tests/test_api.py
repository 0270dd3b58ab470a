"""Public API behaviour and its errors."""

import pytest
import torch
from conftest import tiny_bert
from transformers import GPT2Config, GPT2Model

import tokenfuse
from tokenfuse.methods import Method


def test_apply_returns_the_model_and_accepts_a_method_object(tokenizer):
    model = tiny_bert()
    method = tokenfuse.methods.make("tome", keep=0.6, similarity="keys")
    assert tokenfuse.apply(model, method) is model
    assert tokenfuse.patch_of(model).method is method
    with pytest.raises(ValueError, match="method object"):
        tokenfuse.apply(model, method, keep=0.5)


def test_unknown_method_names_the_choices():
    with pytest.raises(ValueError, match="unknown method 'nope'.*tome"):
        tokenfuse.apply(tiny_bert(), "nope")


def test_bad_option_and_keep_are_explained():
    with pytest.raises(ValueError, match="keep must be"):
        tokenfuse.apply(tiny_bert(), "tome", keep=0)
    with pytest.raises(TypeError, match="tokenfuse methods"):
        tokenfuse.apply(tiny_bert(), "tome", colour="red")
    with pytest.raises(ValueError, match="similarity"):
        tokenfuse.apply(tiny_bert(), "tome", similarity="queries")
    with pytest.raises(ValueError, match="reduction points"):
        tokenfuse.apply(tiny_bert(layers=2), "tome", schedule=[0.5, 0.4])


def test_unsupported_model_lists_supported_families():
    gpt2 = GPT2Model(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=10))
    with pytest.raises(TypeError, match="'gpt2'.*bert, roberta"):
        tokenfuse.apply(gpt2, "tome")
    with pytest.raises(TypeError, match="Linear"):
        tokenfuse.apply(torch.nn.Linear(2, 2), "tome")


def test_a_wrapper_exposing_a_supported_config_is_refused_clearly():
    """A SentenceTransformer exposes its BERT's config; one whose first module is not a
    sentence-transformers Transformer used to fail with an AttributeError deep in the checks."""

    class SentenceTransformer(torch.nn.Sequential):
        @property
        def config(self):
            return self[0].config

    wrapped = SentenceTransformer(tiny_bert())
    with pytest.raises(TypeError, match="first module is a sentence-transformers Transformer.*BertModel"):
        tokenfuse.apply(wrapped, "tome")
    assert tokenfuse.patch_of(wrapped) is None


def test_unsupported_attention_backend_is_refused():
    model = tiny_bert()
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="attn_implementation='sdpa'"):
        tokenfuse.apply(model, "tome")


def test_applying_twice_replaces_the_first(tokenizer, texts):
    model = tiny_bert()
    tokenfuse.apply(model, "random", keep=0.5)
    tokenfuse.apply(model, "tome", keep=0.5)
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    tokenfuse.remove(model)
    tokenfuse.apply(model, "tome", keep=0.5)
    assert hooks == sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_last_tokens_needs_a_reduced_forward():
    with pytest.raises(RuntimeError, match="apply a method"):
        tokenfuse.token_sizes(tiny_bert())


def test_a_researcher_can_register_a_method():
    @tokenfuse.register
    class DropLast(Method):
        """Prunes the last movable tokens: a toy for the registry."""

        name = "test-drop-last"
        paper = "none"

        def decide(self, inp):
            n = inp.x.shape[1]
            pos = torch.arange(n).expand(inp.x.shape[0], n)
            movable = inp.tokens.mask & ~inp.tokens.protected
            rank_from_end = movable.flip(1).cumsum(1).flip(1)
            drop = movable & (rank_from_end <= inp.remove[:, None])
            return tokenfuse.Reduction.hard(torch.where(drop, -1, pos))

    try:
        model = tokenfuse.apply(tiny_bert(), "test-drop-last", keep=0.5)
        ids = torch.tensor([[101] + list(range(2000, 2020)) + [102]])
        with torch.inference_mode():
            out = model(input_ids=ids).last_hidden_state
        assert out.shape[1] < ids.shape[1]
        assert tokenfuse.token_sizes(model).sum() < ids.shape[1]  # pruned tokens are gone
    finally:
        tokenfuse.methods.registry._METHODS["token"].pop("test-drop-last")
    with pytest.raises(TypeError, match="subclass"):
        tokenfuse.register(object)


def test_cls_method_on_a_model_without_cls_is_refused(monkeypatch):
    from tokenfuse.adapters import text_families

    class NeedsCls(Method):
        name, paper = "test-needs-cls", "none"
        needs = frozenset({"cls_attention"})

    no_cls = text_families.Family(
        "bert", ("bert",), "embeddings", "encoder.layer", "attention", ("q", "k", "v"), False
    )
    monkeypatch.setattr(text_families, "FAMILIES", (no_cls,))
    with pytest.raises(ValueError, match="no \\[CLS\\] token"):
        tokenfuse.apply(tiny_bert(), NeedsCls(keep=0.5))
