"""A patched model outside the single-threaded `model(...)` path: concurrent calls, direct
`forward()`, copies, pickling, left padding, other dtypes, and gradients."""

import copy
import pickle
import re
import threading
import time
from functools import partial

import pytest
import torch
from conftest import MODELS, images, tiny_bert, tiny_vit

import tokenfuse
from tokenfuse.core import pool_mean
from tokenfuse.methods import available
from tokenfuse.methods.tome import ToMe


def encode(model, inputs):
    """(pooled embeddings (B, C), last hidden state, token sizes) of one call, in this thread."""
    with torch.inference_mode():
        hidden = model(**inputs).last_hidden_state
    patched = tokenfuse.patch_of(model) is not None
    sizes = tokenfuse.token_sizes(model) if patched else inputs["attention_mask"]
    return pool_mean(hidden, sizes), hidden, sizes


def logits(model, pixels):
    with torch.inference_mode():
        out = model(pixel_values=pixels).logits
    return out, tokenfuse.token_sizes(model)


def in_threads(calls, repeats=4):
    """Run every call `repeats` times, all calls at once in their own threads: the results of each
    call's runs, and any exception raised."""
    results, errors = [[] for _ in calls], []
    barrier = threading.Barrier(len(calls))

    def run(i):
        try:
            barrier.wait()
            for _ in range(repeats):
                results[i].append(calls[i]())
        except Exception as e:  # noqa: BLE001 (reported by the test)
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, errors


def assert_same(a, b, atol=1e-6):
    for x, y in zip(a, b, strict=True):
        assert x.shape == y.shape and torch.allclose(x, y, rtol=0, atol=atol), (x - y).abs().max()


@pytest.mark.parametrize("method", ["tome", "mctf"])
def test_concurrent_text_calls_equal_the_same_calls_one_by_one(method, tokenizer, texts):
    model = tokenfuse.apply(tiny_bert(), method, keep=0.5)
    batches = [
        tokenizer(texts[i:j], padding=True, return_tensors="pt") for i, j in [(0, 2), (1, 5), (2, 3), (3, 5)]
    ]
    alone = [encode(model, b) for b in batches]
    assert len({a[1].shape for a in alone}) == len(batches)  # every call has its own shape
    results, errors = in_threads([partial(encode, model, b) for b in batches])
    assert not errors, errors
    for expected, runs in zip(alone, results, strict=True):
        for got in runs:
            assert_same(expected, got)


def test_concurrent_vision_calls_equal_the_same_calls_one_by_one():
    model = tokenfuse.apply(tiny_vit(), "tome", keep=0.5)
    pixels = images(6)
    batches = [pixels[:1], pixels[1:3], pixels[3:6], pixels[2:4]]
    alone = [logits(model, p) for p in batches]
    results, errors = in_threads([partial(logits, model, p) for p in batches])
    assert not errors, errors
    for expected, runs in zip(alone, results, strict=True):
        for got in runs:
            assert_same(expected, got)


class SlowToMe(ToMe):
    """ToMe whose decisions take at least 5 ms each, and are counted."""

    name = "slow-tome"

    def decide(self, inp):
        self.calls.append(inp.point)
        time.sleep(0.005)
        return super().decide(inp)


def test_decide_seconds_add_up_over_threads_and_the_last_forward_is_per_thread(tokenizer, texts):
    method = SlowToMe(keep=0.5)
    method.calls = []
    model = tokenfuse.apply(tiny_bert(), method)
    patch = tokenfuse.patch_of(model)
    batches = [tokenizer(texts[i:j], padding=True, return_tensors="pt") for i, j in [(0, 2), (2, 5)]]
    results, errors = in_threads([partial(encode, model, b) for b in batches], repeats=3)
    assert not errors, errors
    assert len(method.calls) >= 6 and patch.decide_seconds >= 0.005 * len(method.calls)
    encode(model, batches[0])
    # this thread's last forward is still the one it ran, whatever the other threads did
    assert tokenfuse.token_sizes(model).shape[0] == 2 and patch.layer_tokens().shape[-1] == 2


def run(model, inputs):
    """The first output (hidden states or logits) of a module call."""
    with torch.inference_mode():
        return model(**inputs)[0]


def forward_direct(model, inputs):
    with torch.inference_mode():
        return model.forward(**inputs)


@pytest.mark.parametrize("family", sorted(MODELS))
def test_a_direct_forward_call_reduces_like_a_module_call(family, tokenizer, texts):
    """sentence-transformers calls `forward()` itself, which skips the model's own hooks."""
    model = tokenfuse.apply(MODELS[family](), "tome", keep=0.5)
    small, large = (tokenizer(t, padding=True, return_tensors="pt") for t in (texts[:2], texts))
    expected, hidden, sizes = encode(model, large)
    direct = forward_direct(model, large).last_hidden_state  # first call
    assert torch.equal(direct, hidden) and torch.equal(tokenfuse.token_sizes(model), sizes)
    encode(model, small)
    direct = forward_direct(model, large).last_hidden_state  # after a call of another shape
    assert torch.equal(direct, hidden) and torch.equal(tokenfuse.token_sizes(model), sizes)
    assert hidden.shape[1] < large["input_ids"].shape[1]


def test_a_direct_forward_call_reduces_like_a_module_call_on_vision():
    model = tokenfuse.apply(tiny_vit(), "tome", keep=0.5)
    pixels = images(3)
    expected, sizes = logits(model, pixels)
    logits(model, pixels[:1])
    assert torch.equal(forward_direct(model, {"pixel_values": pixels}).logits, expected)
    assert torch.equal(tokenfuse.token_sizes(model), sizes) and sizes.shape[1] < 65


def hook_owners(model):
    """The objects that the hooks of every module are bound to."""
    owners = set()
    for module in model.modules():
        for hooks in (module._forward_hooks, module._forward_pre_hooks):
            for hook in hooks.values():
                bound = hook.func if isinstance(hook, partial) else hook
                owners.add(id(getattr(bound, "__self__", None)))
    return owners


@pytest.mark.parametrize("build", [tiny_bert, tiny_vit])
def test_a_deep_copy_reduces_on_its_own_and_removes_on_its_own(build, tokenizer, texts):
    text = build is tiny_bert
    a, b = (
        (tokenizer(t, padding=True, return_tensors="pt") for t in (texts, texts[:2]))
        if text
        else ({"pixel_values": p} for p in (images(3), images(1)))
    )
    original = tokenfuse.apply(build(), "tome", keep=0.5)
    expected = run(original, a)
    clone = copy.deepcopy(original)
    patch = tokenfuse.patch_of(clone)
    assert patch is not tokenfuse.patch_of(original) and patch.model is clone
    assert hook_owners(clone) == {id(patch)}
    assert torch.equal(run(clone, a), expected)
    sizes = tokenfuse.token_sizes(clone)
    run(original, b)  # the original's forward leaves the copy's state alone
    assert torch.equal(tokenfuse.token_sizes(clone), sizes)
    tokenfuse.remove(clone)
    assert torch.equal(run(clone, a), run(build(), a))  # the copy computes as before
    assert torch.equal(run(original, a), expected)  # the original still reduces


@pytest.mark.parametrize("build", [tiny_bert, tiny_vit])
def test_a_pickled_model_reduces_tokens_as_the_original(build, tokenizer, texts):
    inputs = (
        tokenizer(texts, padding=True, return_tensors="pt")
        if build is tiny_bert
        else {"pixel_values": images()}
    )
    original = tokenfuse.apply(build(), "tome", keep=0.5)
    expected = run(original, inputs)
    loaded = pickle.loads(pickle.dumps(original))
    assert torch.equal(run(loaded, inputs), expected)
    assert torch.equal(tokenfuse.token_sizes(loaded), tokenfuse.token_sizes(original))
    tokenfuse.remove(loaded)
    assert not hook_owners(loaded) - {id(None)}


def padded(tokenizer, texts, family, side):
    """A batch padded on `side`; BERT and DistilBERT get position ids counted from the first real
    token (RoBERTa counts them from the ids itself), so that the model sees the same sequences."""
    inputs = tokenizer(texts, padding=True, padding_side=side, return_tensors="pt")
    if family != "roberta":
        mask = inputs["attention_mask"]
        inputs["position_ids"] = (mask.cumsum(-1) - 1).clamp_min(0)
    if family == "distilbert":
        del inputs["token_type_ids"]
    return inputs


@pytest.mark.parametrize("family", sorted(MODELS))
@pytest.mark.parametrize("method", sorted(available()))
def test_left_padding_reduces_as_right_padding_and_protects_cls_and_sep(family, method, tokenizer, texts):
    model = MODELS[family]()
    right, left = (padded(tokenizer, texts, family, side) for side in ("right", "left"))
    assert not torch.equal(right["input_ids"], left["input_ids"])
    assert torch.allclose(encode(model, right)[0], encode(model, left)[0], atol=1e-5)  # a fair comparison
    tokenfuse.apply(model, method, keep=0.5)
    ends = {}
    for side, inputs in (("right", right), ("left", left)):
        pooled, hidden, _ = encode(model, inputs)
        tokens = tokenfuse.last_tokens(model)
        assert hidden.shape[1] < inputs["input_ids"].shape[1]
        assert torch.all(tokens.protected.sum(-1) == 2) and torch.all(tokens.size[tokens.protected] == 1)
        ends[side] = pooled, hidden[tokens.protected]
    for a, b in zip(ends["right"], ends["left"], strict=True):
        assert torch.allclose(a, b, rtol=0, atol=1e-5), (method, (a - b).abs().max())


def reference_and_reduced(build, inputs, dtype, keep):
    """(the unpatched model's output, the patched model's output) in `dtype`."""
    model = build().to(dtype)
    with torch.inference_mode():
        before = model(**inputs)[0]
        after = tokenfuse.apply(model, "tome", keep=keep)(**inputs)[0]
    return before, after, tokenfuse.token_sizes(model)


def as_inputs(build, tokenizer, texts, dtype=torch.float32):
    if build is tiny_bert:
        return tokenizer(texts, padding=True, return_tensors="pt")
    return {"pixel_values": images().to(dtype)}


@pytest.mark.parametrize(
    "build, dtype", [(tiny_bert, torch.float64), (tiny_bert, torch.bfloat16), (tiny_vit, torch.bfloat16)]
)
def test_other_dtypes_reduce_and_are_bit_identical_at_keep_one(build, dtype, tokenizer, texts):
    inputs = as_inputs(build, tokenizer, texts, dtype)
    before, after, _ = reference_and_reduced(build, inputs, dtype, keep=1.0)
    assert after.dtype == dtype and torch.equal(before, after)
    before, after, sizes = reference_and_reduced(build, inputs, dtype, keep=0.5)
    assert after.dtype == dtype and torch.isfinite(after).all()
    assert after.shape[-2] < before.shape[-2] or build is tiny_vit  # ViT: logits, reduced inside


@pytest.mark.parametrize("build", [tiny_bert, tiny_vit])
def test_bfloat16_reduction_is_close_to_float32(build, tokenizer, texts):
    """bf16 keeps 8 bits of mantissa (relative error 2^-8 per rounding); over a few layers and the
    method's decisions made on rounded scores, outputs of unit scale stay within 0.1 of fp32's."""
    inputs = as_inputs(build, tokenizer, texts, torch.float32)
    _, full, sizes = reference_and_reduced(build, inputs, torch.float32, keep=0.5)
    half_inputs = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in inputs.items()}
    _, half, half_sizes = reference_and_reduced(build, half_inputs, torch.bfloat16, keep=0.5)
    if build is tiny_bert:
        full, half = pool_mean(full, sizes), pool_mean(half.float(), half_sizes)
    assert (half.float() - full).abs().max() < 0.1


def gradients(model, inputs, text):
    """Gradients of a scalar loss on every parameter, after one backward in eval mode."""
    model.zero_grad()
    out = model(**inputs)
    if text:
        patch = tokenfuse.patch_of(model)
        size = inputs["attention_mask"] if patch is None else tokenfuse.token_sizes(model)
        loss = pool_mean(out.last_hidden_state, size).square().sum()
    else:
        loss = torch.nn.functional.cross_entropy(out.logits, torch.arange(len(out.logits)) % 5)
    loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("build", [tiny_bert, tiny_vit])
def test_gradients_flow_through_a_reduced_model(build, tokenizer, texts):
    text = build is tiny_bert
    inputs = as_inputs(build, tokenizer, texts)
    model = build()
    full = gradients(model, inputs, text)
    tokenfuse.apply(model, "tome", keep=1.0)
    same = gradients(model, inputs, text)
    assert same.keys() == full.keys() and all(torch.equal(same[k], full[k]) for k in full)
    tokenfuse.apply(model, "tome", keep=0.5)
    reduced = gradients(model, inputs, text)
    assert tokenfuse.token_sizes(model).shape[1] < (inputs["input_ids"].shape[1] if text else 65)
    params = [n for n, _ in model.named_parameters() if "embeddings." in n or re.search(r"layers?\.\d+\.", n)]
    layers = {int(re.search(r"layers?\.(\d+)\.", n).group(1)) for n in params if "embeddings." not in n}
    assert layers == set(range(model.config.num_hidden_layers)) and any("embeddings." in n for n in params)
    for n in params:
        assert n in reduced and torch.isfinite(reduced[n]).all() and reduced[n].abs().sum() > 0, n
    assert any(not torch.allclose(reduced[k], full[k]) for k in full)  # the reduction changed them
