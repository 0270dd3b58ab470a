import torch

from tokenfuse.core import Tokens
from tokenfuse.methods import LayerInput, make


def decide(n, remove, real=None):
    real = real or [n]
    mask = torch.tensor([[i < r for i in range(n)] for r in real])
    tokens = Tokens.start(mask, torch.zeros_like(mask))
    inp = LayerInput(point=0, x=torch.randn(len(real), n, 4), tokens=tokens, remove=torch.tensor(remove))
    return make("pool").decide(inp).dest[..., 0]


def test_pool_merges_neighbours_spread_evenly():
    dest = decide(16, [2])[0].tolist()
    merged = [i for i, d in enumerate(dest) if d != i]
    assert all(dest[i] == i + 1 for i in merged)  # only into the right neighbour
    assert merged == [0, 8]  # two merges: one in each half


def test_pool_removes_the_requested_count_per_sequence():
    dest = decide(16, [8, 3], real=[16, 9])
    moved = (dest != torch.arange(16)).sum(-1)
    assert moved.tolist() == [8, 3]
    assert (dest[1, 9:] == torch.arange(9, 16)).all()  # padding untouched
