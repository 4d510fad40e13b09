"""FINOLA read as one-way wave equations (Chen et al., "On the Hidden Waves of Image", arXiv 2310.12976).

In each quadrant of the map around q, Eq. 2 reads dz/dx = sx P z_n and dz/dy = sy Q z_n, with (P, sx) = (A, +1)
right of q and (A_neg, -1) left of it (a step towards -x adds A_neg z_n), (Q, sy) = (B, +1) below q and (B_neg, -1)
above it. With Q invertible, dz/dx = M dz/dy for M = (sx P)(sy Q)^-1, and with M = V diag(lambda) V^-1 the channels
of zeta = V^-1 z obey d zeta_k/dx = lambda_k d zeta_k/dy: each is a one-way wave with its own speed lambda_k (complex
in general). The quadrants share the speeds only when their M agree; the init's A_neg = -A, B_neg = -B gives one M
to all four, training need not keep it.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from weights import atomic_path

# quadrant -> (the x matrix, its sign, the y matrix, its sign)
QUADRANTS = {"right-down": ("A", 1, "B", 1), "left-down": ("A_neg", -1, "B", 1),
             "right-up": ("A", 1, "B_neg", -1), "left-up": ("A_neg", -1, "B_neg", -1)}


def quadrant_matrix(params: dict, quadrant: str) -> torch.Tensor:
    """M = (sx P)(sy Q)^-1 of ``quadrant`` (``QUADRANTS``), in float64."""
    p, sx, q, sy = QUADRANTS[quadrant]
    P, Q = sx * params[p].detach().double().cpu(), sy * params[q].detach().double().cpu()
    return torch.linalg.solve(Q.T, P.T).T


def speeds(params: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per quadrant (the speeds lambda (C,) complex, V^-1 (C, C) complex) of the eigen-decomposition
    M = V diag(lambda) V^-1, eigenvalues sorted by real part, then imaginary part; V^-1 maps z to zeta."""
    out = {}
    for name in QUADRANTS:
        lam, V = torch.linalg.eig(quadrant_matrix(params, name))
        order = sorted(range(len(lam)), key=lambda i: (lam[i].real.item(), lam[i].imag.item()))
        out[name] = lam[order], torch.linalg.inv(V[:, order])
    return out


def quadrant_masks(size, origin) -> dict[str, torch.Tensor]:
    """Per quadrant, the interior positions (H - 2, W - 2) strictly inside it, where a central difference along x
    and along y stays within the quadrant."""
    H, W = size
    r0, c0 = origin
    rows, cols = torch.arange(1, H - 1)[:, None], torch.arange(1, W - 1)[None, :]
    right, left, down, up = cols > c0, cols < c0, rows > r0, rows < r0
    return {"right-down": right & down, "left-down": left & down, "right-up": right & up, "left-up": left & up}


def wave_sums(z: torch.Tensor, decompositions: dict) -> dict[str, dict[str, torch.Tensor]]:
    """Per quadrant, squared norms over channels summed over the batch, per interior position (H - 2, W - 2), of
    ``r`` = zeta_x - lambda zeta_y and its two terms ``zx`` = zeta_x, ``ly`` = lambda zeta_y, with zeta = V^-1 z
    and central differences (``decompositions``: ``speeds(params)``)."""
    if z.dim() != 4 or min(z.shape[-2:]) < 3:
        raise ValueError(f"z: expected maps (B, C, H, W) with H, W >= 3, got {tuple(z.shape)}")
    d = z.detach().double().cpu()
    zx = ((d[..., 2:] - d[..., :-2]) / 2)[..., 1:-1, :].to(torch.complex128)
    zy = ((d[..., 2:, :] - d[..., :-2, :]) / 2)[..., 1:-1].to(torch.complex128)
    out = {}
    for name, (lam, Vinv) in decompositions.items():
        ex, ey = (torch.einsum("ij,bjhw->bihw", Vinv, t) for t in (zx, zy))
        ly = lam[None, :, None, None] * ey
        out[name] = {k: t.abs().square().sum((0, 1)) for k, t in (("r", ex - ly), ("zx", ex), ("ly", ly))}
    return out


def wave_relative(sums: dict[str, torch.Tensor], mask: torch.Tensor) -> float:
    """|r| / (|zeta_x| + |lambda zeta_y|) over the positions in ``mask``: 0 when every channel of zeta is an exact
    one-way wave there, about 0.7 for unrelated terms of equal size, 1 when one dwarfs the other."""
    r, a, b = (sums[k][mask].sum().sqrt().item() for k in ("r", "zx", "ly"))
    return r / max(a + b, 1e-30)


def speed_facts(decompositions: dict, params: dict) -> dict:
    """The right-down quadrant's speeds (the fraction real, the largest |lambda|, the median |lambda|) and how far
    each other quadrant's M is from it (relative Frobenius distance; 0: the same speeds and waves)."""
    lam = decompositions["right-down"][0]
    tol = 1e-9 * lam.abs().max().clamp_min(1e-30)
    base = quadrant_matrix(params, "right-down")
    facts = {"speeds_real_fraction": (lam.imag.abs() <= tol).double().mean().item(),
             "speeds_abs_max": lam.abs().max().item(), "speeds_abs_median": lam.abs().median().item()}
    for name in QUADRANTS:
        if name != "right-down":
            gap = (quadrant_matrix(params, name) - base).norm() / base.norm().clamp_min(1e-300)
            facts[f"M_{name}_vs_right_down"] = gap.item()
    return facts


def save_speeds(decompositions: dict, path) -> Path:
    """Every quadrant's speeds lambda as [real, imaginary] pairs, in a JSON file."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps({q: lam.view(torch.float64).reshape(-1, 2).tolist()
                                   for q, (lam, _) in decompositions.items()}))
    return Path(path)
