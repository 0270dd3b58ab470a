"""torch.compile of a model reduced in the default mode (static mode: tests/test_static.py). Its
hooks read counts back from the tensors, so they run outside the compiled graphs; the host's code
between two hooks compiles once for every layer and every width."""

import pytest
import torch
from conftest import tiny_bert

import tokenfuse


def run(model, tokenizer, texts):
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.inference_mode():
        hidden = model(**batch).last_hidden_state
    return hidden, tokenfuse.patch_of(model).tokens.size, batch["input_ids"].shape[1]


@pytest.mark.slow
def test_the_default_mode_compiles_nothing_per_layer_and_recompiles_nothing_within_a_call(tokenizer, texts):
    """What a call compiles does not grow with depth (nothing guards on a hook, its arguments or its
    layer: the widths, which change from layer to layer, are dynamic from the first layer on); a
    call at a new padded length compiles nothing once lengths have changed once (as for any model:
    the first change makes the input's shape dynamic); the compiled model gives what the eager one
    gives, token sizes included."""
    from torch._dynamo.utils import counters

    batches = (texts[:4], [texts[0], *texts[3:]], [texts[0], texts[1], texts[3]])  # three padded lengths
    compiled_graphs = {}
    for layers in (2, 4):
        model = tokenfuse.apply(tiny_bert(layers=layers), "tome", keep=0.5)
        compiled = torch.compile(model)
        torch._dynamo.reset()
        counters.clear()
        graphs, lengths = [], []
        for batch in batches:
            out, size, n = run(compiled, tokenizer, batch)
            graphs.append(counters["stats"]["unique_graphs"])
            lengths.append(n)
            eager, eager_size, _ = run(model, tokenizer, batch)
            torch.testing.assert_close(out, eager, atol=1e-5, rtol=0)
            assert torch.equal(size, eager_size)
        assert len(set(lengths)) == 3, lengths
        assert graphs[2] == graphs[1], graphs  # the third length reuses the dynamic graphs
        compiled_graphs[layers] = graphs
    assert compiled_graphs[2] == compiled_graphs[4]
