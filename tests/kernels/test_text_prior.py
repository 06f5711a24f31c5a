"""text_prior: two-pass Triton scores == reference softmax column sums (GQA-summed), spans incl. empty."""
import pytest
import torch

from hybridkv_kernels import text_prior
from kernel_testutil import gen, poison, randn, seed_of

pytestmark = pytest.mark.triton

D = 16


def _run(W, P, Hq, H, dtype, span, device, seed, block_p=16):
    g = gen(seed)
    q = randn(g, W, Hq, D, dtype=dtype, device=device)
    k = randn(g, P, H, D, dtype=dtype, device=device)
    q_pos = torch.arange(P - W, P, dtype=torch.int32, device=device)
    start, end = span if span is not None else (0, P)
    out = poison(torch.empty(H, end - start, device=device))
    text_prior.launch(q, k, q_pos, 0.3, out, span=span, block_p=block_p)
    ref = text_prior.reference(q, k, q_pos, 0.3, span=span)
    torch.testing.assert_close(out.cpu(), ref.cpu(), atol=2e-5, rtol=2e-5)
    return out


@pytest.mark.parametrize("Hq,H", [(2, 2), (4, 2), (7, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("span", [None, (5, 22), (9, 9)])  # all keys, a "visual" span, an empty visual span
def test_text_prior_matches_reference(Hq, H, dtype, span, device):
    _run(W=6, P=33, Hq=Hq, H=H, dtype=dtype, span=span, device=device, seed=seed_of(Hq, H, dtype, span))


@pytest.mark.parametrize("W,P", [(1, 1), (1, 17), (20, 20), (3, 16)])  # single token, a window over the prompt
def test_text_prior_edges(W, P, device):
    out = _run(W=W, P=P, Hq=4, H=2, dtype=torch.float32, span=None, device=device, seed=seed_of(W, P))
    torch.testing.assert_close(out.sum().cpu(), torch.tensor(float(W * 4)), rtol=1e-5, atol=1e-4)  # mass


def test_pool_and_dispatch():
    g = gen(1)
    q, k = randn(g, 4, 2, D), randn(g, 12, 1, D)
    q_pos = torch.arange(8, 12, dtype=torch.int32)
    out = poison(torch.empty(1, 12))
    text_prior.run(q, k, q_pos, 0.3, out, backend="torch")
    assert torch.equal(out, text_prior.reference(q, k, q_pos, 0.3))
    pooled = text_prior.pool(out, 3)
    assert pooled.shape == out.shape and torch.all(pooled >= out)


@pytest.mark.parametrize("S", [2, 5])  # key splits of the row statistics, merged before the column pass
def test_text_prior_key_splits(S, device):
    g = gen(seed_of("splits", S))
    W, Hq, H, P = 5, 4, 2, 70
    q, k = randn(g, W, Hq, D, device=device), randn(g, P, H, D, device=device)
    q_pos = torch.tensor([3, 30, 50, 68, 69], dtype=torch.int32, device=device)
    ws = tuple(poison(torch.empty(Hq, S, W, device=device)) for _ in range(2))
    out = poison(torch.empty(H, P, device=device))
    text_prior.launch(q, k, q_pos, 0.3, out, workspace=ws, block_p=16)
    torch.testing.assert_close(out.cpu(), text_prior.reference(q, k, q_pos, 0.3).cpu(), atol=2e-5, rtol=2e-5)
