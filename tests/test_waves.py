"""waves.py: FINOLA as one-way waves. On a map built from exact waves, zeta = V^-1 z satisfies
d zeta/dx = lambda d zeta/dy in every quadrant and the speeds are lambda; on unrelated maps it does not."""
import pytest
import torch
from torch.testing import assert_close

import finola
import waves


def wave_world(C=4, size=(7, 9), seed=0):
    """A, B with A B^-1 = V diag(lam) V^-1 (B = I), the init's A_neg = -A, B_neg = -B, and maps whose channels of
    zeta are exact one-way waves: zeta_k(x, y) = a_k (y + lam_k x) + b_k, z = V zeta."""
    g = torch.Generator().manual_seed(seed)
    lam = torch.linspace(-1.5, 2.0, C, dtype=torch.float64)
    V = torch.randn(C, C, generator=g, dtype=torch.float64) + 2 * torch.eye(C, dtype=torch.float64)
    A = V @ torch.diag(lam) @ torch.linalg.inv(V)
    params = {"A": A, "B": torch.eye(C, dtype=torch.float64), "A_neg": -A, "B_neg": -torch.eye(C, dtype=torch.float64)}
    a, b = torch.randn(3, C, generator=g, dtype=torch.float64), torch.randn(3, C, generator=g, dtype=torch.float64)
    y, x = torch.meshgrid(torch.arange(size[0], dtype=torch.float64), torch.arange(size[1], dtype=torch.float64),
                          indexing="ij")
    zeta = a[:, :, None, None] * (y + lam[None, :, None, None] * x) + b[:, :, None, None]
    return params, lam, torch.einsum("ij,bjhw->bihw", V, zeta)


def test_exact_waves_have_zero_residual_in_every_quadrant_and_their_own_speeds():
    params, lam, z = wave_world()
    decompositions = waves.speeds(params)
    for quadrant, (speeds, _) in decompositions.items():
        assert_close(speeds.real, lam, rtol=0, atol=1e-9, msg=quadrant)
        assert speeds.imag.abs().max() < 1e-9
    sums, masks = waves.wave_sums(z, decompositions), waves.quadrant_masks(z.shape[-2:], (3, 4))
    for quadrant in waves.QUADRANTS:
        assert masks[quadrant].sum() == 6 and waves.wave_relative(sums[quadrant], masks[quadrant]) < 1e-10
    facts = waves.speed_facts(decompositions, params)
    assert facts["speeds_real_fraction"] == 1.0 and facts["speeds_abs_max"] == pytest.approx(2.0)
    assert max(v for k, v in facts.items() if k.startswith("M_")) < 1e-12, "the init's signs: one M for all"


def test_quadrants_part_ways_when_the_negative_matrices_do():
    params, _, z = wave_world()
    params = dict(params, A_neg=-2 * params["A"])  # left of q the waves run twice as fast
    decompositions = waves.speeds(params)
    facts = waves.speed_facts(decompositions, params)
    assert facts["M_left-down_vs_right_down"] == pytest.approx(1.0) and facts["M_right-up_vs_right_down"] < 1e-12
    assert_close(decompositions["left-down"][0].real, 2 * decompositions["right-down"][0].real)
    sums, masks = waves.wave_sums(z, decompositions), waves.quadrant_masks(z.shape[-2:], (3, 4))
    assert waves.wave_relative(sums["right-down"], masks["right-down"]) < 1e-10
    assert waves.wave_relative(sums["left-down"], masks["left-down"]) > 0.1, "the map's waves have the old speeds"


def test_a_map_of_noise_is_no_wave():
    params, _, z = wave_world()
    noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    sums, masks = waves.wave_sums(noise, waves.speeds(params)), waves.quadrant_masks(z.shape[-2:], (3, 4))
    assert all(waves.wave_relative(sums[q], masks[q]) > 0.3 for q in waves.QUADRANTS)


def test_a_finola_map_is_a_wave_where_eq1_steps_agree():
    """A FINOLA map with A = B, A_neg = B_neg = -A: speed 1 in every quadrant; right-down and left-up step with one
    matrix, so there z depends on x + y alone, an exact wave even between grid points."""
    p = finola.init(6, generator=torch.Generator().manual_seed(0), dtype=torch.float64, std=0.3)
    same = {"A": p["A"], "B": p["A"], "A_neg": p["A_neg"], "B_neg": p["A_neg"]}
    q = torch.randn(2, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    z = finola.expand(same, q, size=(7, 7), origin=(3, 3))
    decompositions = waves.speeds(same)
    assert_close(decompositions["right-down"][0], torch.ones(6, dtype=torch.complex128))
    sums, masks = waves.wave_sums(z, decompositions), waves.quadrant_masks((7, 7), (3, 3))
    got = {q: waves.wave_relative(sums[q], masks[q]) for q in waves.QUADRANTS}
    assert got["right-down"] < 1e-12 and got["left-up"] < 1e-12, "one matrix both ways: z is a function of x + y"
    noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    noisy = waves.wave_sums(noise, decompositions)
    for q in ("left-down", "right-up"):  # A one way, A_neg = -A the other: a wave in the continuum, not per step
        assert 1e-3 < got[q] < waves.wave_relative(noisy[q], masks[q]) / 2, q
    with pytest.raises(ValueError, match="z: expected maps"):
        waves.wave_sums(z[..., :2], decompositions)
