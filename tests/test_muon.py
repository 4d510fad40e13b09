"""muon.py: the Newton–Schulz orthogonalisation against the SVD, and Muon's step against a slow per-weight version of
its equations (AdamW's on vectors), batched over shapes, through a state_dict round trip."""
import pytest
import torch
from torch.testing import assert_close

import muon


@pytest.mark.parametrize("shape", [(16, 16), (8, 24), (24, 8), (3, 5, 12)])
def test_orthogonalise_keeps_the_singular_vectors_and_brings_the_values_near_one(shape):
    gen = torch.Generator().manual_seed(0)
    *batch, m, n = shape
    u = torch.linalg.qr(torch.randn(*batch, m, m, generator=gen, dtype=torch.float64))[0][..., :min(m, n)]
    v = torch.linalg.qr(torch.randn(*batch, n, n, generator=gen, dtype=torch.float64))[0][..., :min(m, n)]
    s = torch.linspace(3.0, 0.3, min(m, n), dtype=torch.float64)      # a condition number of 10
    g = u @ torch.diag_embed(s.expand(*batch, -1)) @ v.mT
    o = muon.orthogonalise(g)
    values = u.mT @ o @ v                  # diagonal when o keeps g's singular vectors
    diagonal = torch.diagonal(values, dim1=-2, dim2=-1)
    assert_close(values, torch.diag_embed(diagonal), rtol=0, atol=1e-9)
    assert ((diagonal > 0.6) & (diagonal < 1.25)).all(), diagonal
    assert_close(muon.orthogonalise(g.mT), o.mT, rtol=0, atol=1e-12)   # wide and tall alike


def test_orthogonalise_on_a_batch_equals_each_matrix_alone():
    g = torch.randn(4, 6, 10, generator=torch.Generator().manual_seed(1))
    assert_close(muon.orthogonalise(g), torch.stack([muon.orthogonalise(m) for m in g]))


def slow_muon(params, grads_per_step, *, lr, wd, momentum=0.95, betas=(0.9, 0.95), eps=1e-8):
    """The module docstring's equations, one weight at a time; vectors through torch's AdamW."""
    params = [p.detach().clone() for p in params]
    vectors = [p.requires_grad_() for p in params if p.dim() < 2]
    adam = torch.optim.AdamW(vectors, lr=lr, betas=betas, eps=eps, weight_decay=wd) if vectors else None
    buffers = [torch.zeros_like(p) for p in params]
    for grads in grads_per_step:
        for p, g, m in zip(params, grads, buffers):
            if p.dim() < 2:
                p.grad = g.clone()
                continue
            m.mul_(momentum).add_(g)
            o = muon.orthogonalise((g + momentum * m).reshape(len(p), -1))
            with torch.no_grad():
                p.mul_(1 - lr * wd).sub_(lr * 0.2 * max(o.shape) ** 0.5 * o.view_as(p))
        if adam:
            adam.step()
    return [p.detach() for p in params]


# kernels, wide and tall matrices sharing a padded shape, one in ns_dtype (from 128 rows), vectors
SHAPES = [(12, 8, 3, 3), (12, 8, 3, 3), (12, 1, 3, 3), (16, 40), (40, 16), (14, 60), (1, 1, 16), (130, 140), (12,),
          (40,)]


def steps(optimizer, params, grads):
    for step in grads:
        for p, g in zip(params, step):
            p.grad = g.clone()
        optimizer.step()


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_step_matches_the_slow_version(wd):
    gen = torch.Generator().manual_seed(2)
    start = [torch.randn(s, generator=gen) for s in SHAPES]
    grads = [[torch.randn(s, generator=gen) for s in SHAPES] for _ in range(4)]
    params = [torch.nn.Parameter(p.clone()) for p in start]
    steps(muon.Muon(params, lr=0.01, weight_decay=wd, ns_dtype=torch.float32), params, grads)
    for fast, slow in zip(params, slow_muon(start, grads, lr=0.01, wd=wd)):
        assert_close(fast.detach(), slow, rtol=1e-5, atol=1e-6)


def test_the_bfloat16_iteration_lands_near_float32():
    """bfloat16 from 128 rows (the (130, 140) weight): four steps land within 3 % of float32's way."""
    gen = torch.Generator().manual_seed(4)
    start = [torch.randn(s, generator=gen) for s in SHAPES]
    grads = [[torch.randn(s, generator=gen) for s in SHAPES] for _ in range(4)]
    ends = {}
    for dtype in (torch.float32, torch.bfloat16):
        ends[dtype] = [torch.nn.Parameter(p.clone()) for p in start]
        steps(muon.Muon(ends[dtype], lr=0.01, ns_dtype=dtype), ends[dtype], grads)
    index = SHAPES.index((130, 140))
    moved = (ends[torch.float32][index] - start[index]).norm()
    apart = (ends[torch.bfloat16][index] - ends[torch.float32][index]).norm()
    assert apart < 0.03 * moved, (apart, moved)
    for i, shape in enumerate(SHAPES):  # the rest iterate in float32 either way
        if i != index:
            assert_close(ends[torch.bfloat16][i], ends[torch.float32][i], rtol=0, atol=0)


def test_a_state_dict_round_trip_continues_the_same_steps():
    gen = torch.Generator().manual_seed(3)
    start = [torch.randn(s, generator=gen) for s in SHAPES]
    grads = [[torch.randn(s, generator=gen) for s in SHAPES] for _ in range(4)]

    params = [torch.nn.Parameter(p.clone()) for p in start]
    straight = muon.Muon(params, lr=0.01)
    steps(straight, params, grads)
    half = [torch.nn.Parameter(p.clone()) for p in start]
    first = muon.Muon(half, lr=0.01)
    steps(first, half, grads[:2])
    again = [torch.nn.Parameter(p.detach().clone()) for p in half]
    second = muon.Muon(again, lr=0.01)
    second.load_state_dict(first.state_dict())
    steps(second, again, grads[2:])
    for a, b in zip(params, again):
        assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("kwargs, message", [(dict(lr=-1.0), "lr"), (dict(lr=0.1, momentum=1.0), "momentum"),
                                             (dict(lr=0.1, betas=(0.9, 1.2)), "betas")])
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        muon.Muon([torch.nn.Parameter(torch.zeros(2, 2))], **kwargs)
