"""A patched model off the single-threaded `model(...)` path: concurrent calls, direct `forward()`,
copies, pickling, left padding, other dtypes, and gradients."""

import copy
import pickle
import re
import threading
import time
from functools import partial

import pytest
import torch
from conftest import MODELS, apply_or_skip, images, tiny_bert, tiny_timm, tiny_vit

import tokenfuse
from tokenfuse.core import pool_mean
from tokenfuse.methods import available
from tokenfuse.methods.tome import ToMe

BUILDS = [tiny_bert, tiny_vit, tiny_timm]


def inputs_for(build, tokenizer, texts, batch=3, dtype=torch.float32):
    """A padded text batch for BERT, `batch` images for the vision models."""
    if build is tiny_bert:
        return tokenizer(texts, padding=True, return_tensors="pt")
    return images(batch).to(dtype)


def call(model, inputs, direct=False):
    """The main output of one call (BERT: last hidden state, vision: logits); `direct` calls
    `model.forward(...)` itself, as sentence-transformers does, which skips the model's own hooks."""
    fn = model.forward if direct else model
    with torch.inference_mode():
        if not isinstance(inputs, torch.Tensor):
            return fn(**inputs).last_hidden_state
        if hasattr(model, "forward_features"):  # timm
            return fn(inputs)
        return fn(pixel_values=inputs).logits


def encode(model, inputs):
    """(pooled embeddings (B, C), last hidden state, token sizes) of one call, in this thread."""
    hidden = call(model, inputs)
    patched = tokenfuse.patch_of(model) is not None
    sizes = tokenfuse.token_sizes(model) if patched else inputs["attention_mask"]
    return pool_mean(hidden, sizes), hidden, sizes


def outputs_and_sizes(model, inputs):
    return call(model, inputs), tokenfuse.token_sizes(model)


def in_threads(calls, repeats=4):
    """Run every call `repeats` times, all calls at once in their own threads: the results of each
    call's runs, and the exceptions raised."""
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


def assert_runs_match(alone, results, errors):
    assert not errors, errors
    for expected, runs in zip(alone, results, strict=True):
        for got in runs:
            for x, y in zip(expected, got, strict=True):
                assert x.shape == y.shape and torch.allclose(x, y, rtol=0, atol=1e-6), (x - y).abs().max()


@pytest.mark.parametrize("method", ["tome", "mctf"])
def test_concurrent_text_calls_equal_the_same_calls_one_by_one(method, tokenizer, texts):
    model = tokenfuse.apply(tiny_bert(), method, keep=0.5)
    spans = [(0, 2), (1, 5), (2, 3), (3, 5)]
    batches = [tokenizer(texts[i:j], padding=True, return_tensors="pt") for i, j in spans]
    alone = [encode(model, b) for b in batches]
    assert len({a[1].shape for a in alone}) == len(batches)  # every call has its own shape
    assert_runs_match(alone, *in_threads([partial(encode, model, b) for b in batches]))


@pytest.mark.parametrize("build", [tiny_vit, tiny_timm])
def test_concurrent_vision_calls_equal_the_same_calls_one_by_one(build):
    model = tokenfuse.apply(build(), "tome", keep=0.5)
    pixels = images(6)
    batches = [pixels[:1], pixels[1:3], pixels[3:6], pixels[2:4]]
    alone = [outputs_and_sizes(model, p) for p in batches]
    assert_runs_match(alone, *in_threads([partial(outputs_and_sizes, model, p) for p in batches]))


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
    _, errors = in_threads([partial(encode, model, b) for b in batches], repeats=3)
    assert not errors, errors
    assert len(method.calls) >= 6 and patch.decide_seconds >= 0.005 * len(method.calls)
    encode(model, batches[0])
    # this thread's last forward is the one it ran, whatever the other threads did
    assert tokenfuse.token_sizes(model).shape[0] == 2 and patch.layer_tokens().shape[-1] == 2


@pytest.mark.parametrize("family", sorted(MODELS))
def test_a_direct_forward_call_reduces_like_a_module_call(family, tokenizer, texts):
    model = tokenfuse.apply(MODELS[family](), "tome", keep=0.5)
    small, large = (tokenizer(t, padding=True, return_tensors="pt") for t in (texts[:2], texts))
    hidden, sizes = outputs_and_sizes(model, large)
    assert hidden.shape[1] < large["input_ids"].shape[1]
    for before in (None, small):  # first call, then after a call of another shape
        if before is not None:
            call(model, before)
        assert torch.equal(call(model, large, direct=True), hidden)
        assert torch.equal(tokenfuse.token_sizes(model), sizes)


@pytest.mark.parametrize("build", [tiny_vit, tiny_timm])
def test_a_direct_forward_call_reduces_like_a_module_call_on_vision(build):
    model = tokenfuse.apply(build(), "tome", keep=0.5)
    pixels = images(3)
    expected, sizes = outputs_and_sizes(model, pixels)
    call(model, pixels[:1])
    assert torch.equal(call(model, pixels, direct=True), expected)
    assert torch.equal(tokenfuse.token_sizes(model), sizes) and sizes.shape[1] < 65


def hook_owners(model) -> set[int]:
    """ids of the patches that the hooks of every module are bound to (directly, or through a
    pooling head's hooks, which hold their patch)."""
    hooks = [h for m in model.modules() for d in (m._forward_hooks, m._forward_pre_hooks) for h in d.values()]
    owners = [(h.func if isinstance(h, partial) else h).__self__ for h in hooks]
    return {id(getattr(owner, "patch", owner)) for owner in owners}


@pytest.mark.parametrize("build", BUILDS)
def test_a_deep_copy_reduces_on_its_own_and_removes_on_its_own(build, tokenizer, texts):
    a, b = inputs_for(build, tokenizer, texts), inputs_for(build, tokenizer, texts[:2], batch=1)
    original = tokenfuse.apply(build(), "tome", keep=0.5)
    expected = call(original, a)
    clone = copy.deepcopy(original)
    patch = tokenfuse.patch_of(clone)
    assert patch is not tokenfuse.patch_of(original) and patch.model is clone
    assert hook_owners(clone) == {id(patch)}
    assert torch.equal(call(clone, a), expected)
    sizes = tokenfuse.token_sizes(clone)
    call(original, b)  # the original's forward leaves the copy's state alone
    assert torch.equal(tokenfuse.token_sizes(clone), sizes)
    tokenfuse.remove(clone)
    assert not hook_owners(clone) and hook_owners(original) == {id(tokenfuse.patch_of(original))}
    assert torch.equal(call(clone, a), call(build(), a))  # the copy computes as before
    assert torch.equal(call(original, a), expected)  # the original still reduces


@pytest.mark.parametrize("build", BUILDS)
def test_a_pickled_model_reduces_tokens_as_the_original(build, tokenizer, texts):
    inputs = inputs_for(build, tokenizer, texts)
    original = tokenfuse.apply(build(), "tome", keep=0.5)
    expected, sizes = outputs_and_sizes(original, inputs)
    loaded = pickle.loads(pickle.dumps(original))
    assert torch.equal(call(loaded, inputs), expected)
    assert torch.equal(tokenfuse.token_sizes(loaded), sizes)
    tokenfuse.remove(loaded)
    assert not hook_owners(loaded) and torch.equal(call(loaded, inputs), call(build(), inputs))


def padded(tokenizer, texts, family, side):
    """A batch padded on `side`; BERT and DistilBERT get position ids counted from the first real
    token (RoBERTa counts them from the ids itself), so that the model sees the same sequences."""
    inputs = tokenizer(texts, padding=True, padding_side=side, return_tensors="pt")
    if family != "roberta":
        inputs["position_ids"] = (inputs["attention_mask"].cumsum(-1) - 1).clamp_min(0)
    if family == "distilbert":
        del inputs["token_type_ids"]
    return inputs


@pytest.mark.parametrize("family", sorted(MODELS))
@pytest.mark.parametrize("method", sorted(n for n, c in available().items() if "grid" not in c.needs))
def test_left_padding_reduces_as_right_padding_and_protects_cls_and_sep(family, method, tokenizer, texts):
    model = MODELS[family]()
    right, left = (padded(tokenizer, texts, family, side) for side in ("right", "left"))
    assert not torch.equal(right["input_ids"], left["input_ids"])
    assert torch.allclose(encode(model, right)[0], encode(model, left)[0], atol=1e-5)  # a fair comparison
    apply_or_skip(model, method, keep=0.5)
    ends = {}
    for side, inputs in (("right", right), ("left", left)):
        pooled, hidden, _ = encode(model, inputs)
        tokens = tokenfuse.last_tokens(model)
        assert hidden.shape[1] < inputs["input_ids"].shape[1]
        # two protected tokens per sequence, standing for themselves: [CLS] and [SEP], as the
        # right-padded batch (whose [CLS] and [SEP] the contract tests check) has them
        assert torch.all(tokens.protected.sum(-1) == 2) and torch.all(tokens.size[tokens.protected] == 1)
        ends[side] = pooled, hidden[tokens.protected]
    for a, b in zip(ends["right"], ends["left"], strict=True):
        assert torch.allclose(a, b, rtol=0, atol=1e-5), (method, (a - b).abs().max())


def unpatched_and_patched(build, inputs, dtype, keep):
    """(the unpatched model's output, the patched model's output, its token sizes) in `dtype`."""
    model = build().to(dtype)
    before = call(model, inputs)
    after = call(tokenfuse.apply(model, "tome", keep=keep), inputs)
    return before, after, tokenfuse.token_sizes(model)


@pytest.mark.parametrize(
    "build, dtype", [(tiny_bert, torch.float64), (tiny_bert, torch.bfloat16), (tiny_vit, torch.bfloat16)]
)
def test_other_dtypes_reduce_and_are_bit_identical_at_keep_one(build, dtype, tokenizer, texts):
    inputs = inputs_for(build, tokenizer, texts, dtype=dtype)
    before, after, _ = unpatched_and_patched(build, inputs, dtype, keep=1.0)
    assert after.dtype == dtype and torch.equal(before, after)
    before, after, sizes = unpatched_and_patched(build, inputs, dtype, keep=0.5)
    assert after.dtype == dtype and torch.isfinite(after).all()
    assert sizes.shape[1] < (inputs["input_ids"].shape[1] if build is tiny_bert else 65)


@pytest.mark.parametrize("build", [tiny_bert, tiny_vit])
def test_bfloat16_reduction_is_close_to_float32(build, tokenizer, texts):
    """bf16 keeps 8 bits of mantissa (0.4% per rounding); through a few layers and decisions made
    on rounded scores, the reduced output (BERT: pooled embeddings, ViT: logits) stays within 5% of
    the fp32 output's scale (measured: 2.7% BERT, 1.3% ViT; unreduced: 0.5%, 0.6%)."""
    pooled = {}
    for dtype in (torch.float32, torch.bfloat16):
        inputs = inputs_for(build, tokenizer, texts, dtype=dtype)
        _, out, sizes = unpatched_and_patched(build, inputs, dtype, keep=0.5)
        pooled[dtype] = pool_mean(out.float(), sizes) if build is tiny_bert else out.float()
    full = pooled[torch.float32]
    assert (pooled[torch.bfloat16] - full).abs().max() <= 0.05 * full.abs().max()


def gradients(model, inputs):
    """Gradients of a scalar loss on every parameter, after one backward (in eval mode)."""
    model.zero_grad()
    if isinstance(inputs, torch.Tensor):
        logits = model(pixel_values=inputs).logits
        loss = torch.nn.functional.cross_entropy(logits, torch.arange(len(logits)) % 5)
    else:
        hidden = model(**inputs).last_hidden_state
        patched = tokenfuse.patch_of(model) is not None
        loss = pool_mean(hidden, tokenfuse.token_sizes(model) if patched else inputs["attention_mask"])
        loss = loss.square().sum()
    loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("build", [tiny_bert, tiny_vit])
def test_gradients_flow_through_a_reduced_model(build, tokenizer, texts):
    inputs = inputs_for(build, tokenizer, texts)
    model = build()
    full = gradients(model, inputs)
    tokenfuse.apply(model, "tome", keep=1.0)
    same = gradients(model, inputs)
    assert same.keys() == full.keys() and all(torch.equal(same[k], full[k]) for k in full)
    tokenfuse.apply(model, "tome", keep=0.5)
    reduced = gradients(model, inputs)
    assert tokenfuse.token_sizes(model).shape[1] < (65 if build is tiny_vit else inputs["input_ids"].shape[1])
    layer = re.compile(r"layers?\.(\d+)\.")
    names = [n for n, _ in model.named_parameters() if "embeddings." in n or layer.search(n)]
    found = {int(layer.search(n).group(1)) for n in names if layer.search(n)}
    assert found == set(range(model.config.num_hidden_layers)) and any("embeddings." in n for n in names)
    for n in names:  # the embeddings and every layer's weights
        assert n in reduced and torch.isfinite(reduced[n]).all() and reduced[n].abs().sum() > 0, n
    assert any(not torch.allclose(reduced[k], full[k]) for k in full)  # the reduction changed them


def test_an_attention_mask_that_is_not_padding_is_refused():
    """A 4-D mask reaches the layers as given; a causal one must not be read as padding."""
    model = tokenfuse.apply(tiny_bert(), "tome", keep=0.5)
    causal = torch.ones(1, 1, 6, 6, dtype=torch.bool).tril()
    with pytest.raises(ValueError, match="not a padding mask"):
        model(input_ids=torch.tensor([[101, 5, 6, 7, 8, 102]]), attention_mask=causal)


def test_protect_ids_need_input_ids():
    model = tokenfuse.apply(tiny_bert(), "tome", keep=0.5, protect_ids=[5])
    with pytest.raises(ValueError, match="pass input_ids"):
        model(inputs_embeds=torch.randn(1, 6, 32))
