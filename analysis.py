"""The paper's analyses of FINOLA maps and embeddings (§2 Eq. 2-5, §3 Fig. 5, App. A, App. E.2), as functions.

Pure functions over tensors come first, each under its equation; then the loops that gather them from a model and a
loader (with a rich progress bar), each writing its PNG figures (matplotlib) and returning a dict of plain numbers.
``eval.py curvature | embedding | pde`` are thin shells over ``curvature_stats``, ``embedding_study`` and
``pde_study``. ``fit_pca`` and ``pca_reconstruct_images`` are ``eval.py reconstruct``'s linear baseline (a PCA of
the training images' pixels with as many components as q has channels). Conventions as in finola.py: maps are
(B, C, H, W), x is the column (last) axis, y the row axis; images are in [0, 1].
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from PIL import Image
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

import finola
import waves
from weights import atomic_path

console = Console(stderr=True)


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of images in [0, 1], (B, 3, H, W) -> (B,): 10 log10(1 / MSE); y is clamped to [0, 1]."""
    mse = (x - y.clamp(0, 1)).square().flatten(1).mean(1)
    return 10 * torch.log10(1 / mse.clamp_min(1e-12))


# ---------------------------------------------------------------------------------------------------------------------
# App. A, Eq. 9: the Gaussian curvature of each channel's feature surface (x, y, z_k(x, y))
#
#     kappa_k = (z_xx z_yy - z_xy^2) / (1 + z_x^2 + z_y^2)^2
# ---------------------------------------------------------------------------------------------------------------------

def _extend(z: torch.Tensor) -> torch.Tensor:
    """z (..., n) with one more sample at each end of the last axis: the quadratic through the three nearest."""
    first = 3 * z[..., :1] - 3 * z[..., 1:2] + z[..., 2:3]
    last = 3 * z[..., -1:] - 3 * z[..., -2:-1] + z[..., -3:-2]
    return torch.cat([first, z, last], -1)


def gaussian_curvature(z: torch.Tensor) -> torch.Tensor:
    """Eq. 9 at every grid point of the surfaces z of shape (..., H, W); returns the same shape.

    Unit grid spacing, x the column (last) axis, y the row axis, central differences: z_x = (z[x+1] - z[x-1]) / 2,
    z_xx = z[x+1] - 2 z[x] + z[x-1], z_xy = (z[+1,+1] - z[+1,-1] - z[-1,+1] + z[-1,-1]) / 4 (same along y).
    Border: the grid is first extended by one sample on every side with the quadratic through the three nearest
    samples along that axis (the corners along both), so a border point gets the second-order one-sided first
    derivative (-3 z0 + 4 z1 - z2) / 2 and the second derivative of its inner neighbour. Surfaces of degree <= 2 in
    each of x and y thus get their exact curvature everywhere; elsewhere the border is one-sided-accurate.
    Needs H, W >= 3.
    """
    if not torch.is_tensor(z) or not z.is_floating_point() or z.dim() < 2:
        raise ValueError(f"z: expected a floating tensor of shape (..., H, W), got "
                         f"{tuple(z.shape) if torch.is_tensor(z) else type(z).__name__}")
    if min(z.shape[-2:]) < 3:
        raise ValueError(f"z: central differences need H, W >= 3, got {tuple(z.shape[-2:])}")
    p = _extend(_extend(z).transpose(-1, -2)).transpose(-1, -2)  # (..., H + 2, W + 2)
    c = p[..., 1:-1, 1:-1]
    right, left, down, up = p[..., 1:-1, 2:], p[..., 1:-1, :-2], p[..., 2:, 1:-1], p[..., :-2, 1:-1]
    zx, zy = (right - left) / 2, (down - up) / 2
    zxx, zyy = right - 2 * c + left, down - 2 * c + up
    zxy = (p[..., 2:, 2:] - p[..., 2:, :-2] - p[..., :-2, 2:] + p[..., :-2, :-2]) / 4
    return (zxx * zyy - zxy.square()) / (1 + zx.square() + zy.square()).square()


# ---------------------------------------------------------------------------------------------------------------------
# Fig. 5: critical channels, ranked per image by the root mean square of their peak positive and negative curvature
# ---------------------------------------------------------------------------------------------------------------------

def rank_channels(z: torch.Tensor, *, top: int) -> dict[str, torch.Tensor]:
    """The ``top`` channels of each map z (B, C, H, W) with the largest sqrt((kappa_+^2 + kappa_-^2) / 2), where
    kappa_+ = max(0, max K) and kappa_- = min(0, min K) over the grid (App. A). Returns (B, top) tensors, sorted by
    decreasing score: ``score``, ``kappa_plus``, ``kappa_minus`` and ``channel`` (the channel's index)."""
    if z.dim() != 4:
        raise ValueError(f"z: expected maps (B, C, H, W), got {tuple(z.shape)}")
    k = gaussian_curvature(z.to(torch.promote_types(z.dtype, torch.float32)))
    plus, minus = k.amax((-2, -1)).clamp_min(0), k.amin((-2, -1)).clamp_max(0)
    score = ((plus.square() + minus.square()) / 2).sqrt()
    score, channel = score.topk(min(top, z.shape[1]), dim=1)
    return {"score": score, "kappa_plus": plus.gather(1, channel), "kappa_minus": minus.gather(1, channel),
            "channel": channel}


# ---------------------------------------------------------------------------------------------------------------------
# Eq. 2 and Eq. 4-5 on a map: dz/dx = A z_n, dz/dy = B z_n, and what the paper derives from them,
#
#     d2z/dx2 = A B^-1 d2z/dxdy = A B^-1 A dz_n/dy = (A B^-1)^2 d2z/dy2     (needs B invertible and Clairaut:
#     B dz_n/dx = d2z/dxdy = d2z/dydx = A dz_n/dy, the integrability condition of the two PDEs together)
# ---------------------------------------------------------------------------------------------------------------------

def eq4_matrix(params: dict) -> torch.Tensor:
    """Eq. 4's (A B^-1)^2 in float64 (B must be invertible: see ``matrix_facts``)."""
    A, B = params["A"].detach().double(), params["B"].detach().double()
    M = torch.linalg.solve(B.T, A.T).T  # A B^-1
    return M @ M


def pde_sums(params: dict, z: torch.Tensor, *, stats: dict | None = None,
             m2: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Squared norms over channels, summed over the batch, per grid position, of every term the checks compare.

    Eq. 2 (forward differences, as Eq. 1 steps; from ``finola.pde_residual``): ``rx``, ``dx``, ``ax`` (H, W-1):
    the residual dz - A z_n along x, the difference dz and A z_n; ``ry``, ``dy``, ``by`` (H-1, W) along y; ``z``
    (H, W) the map itself. Eq. 4 on the interior (H-2, W-2), central differences in float64 with M = A B^-1:
    ``r4``, ``zxx``, ``m2zyy`` (z_xx - M^2 z_yy and its two terms); ``rc``, ``bzx``, ``azy`` (the integrability
    condition B dz_n/dx - A dz_n/dy and its two terms). Sums add over batches; ``relative`` turns them into ratios.
    ``m2``: ``eq4_matrix(params)``, computed once by a caller that sums over many batches.
    """
    if z.dim() != 4 or min(z.shape[-2:]) < 3:
        raise ValueError(f"z: expected maps (B, C, H, W) with H, W >= 3, got {tuple(z.shape)}")
    rx, ry = finola.pde_residual(params, z, stats=stats)
    d = z.double()
    zn = finola.normalize(d, stats=stats)
    A, B = params["A"].double(), params["B"].double()
    m2 = eq4_matrix(params) if m2 is None else m2

    def mix(W, t):  # W applied over the channels of t (B, C, h, w)
        return torch.einsum("ij,bjhw->bihw", W, t)

    def sq(t):
        return t.double().square().sum((0, 1))

    zxx = (d[..., 2:] - 2 * d[..., 1:-1] + d[..., :-2])[..., 1:-1, :]
    zyy = (d[..., 2:, :] - 2 * d[..., 1:-1, :] + d[..., :-2, :])[..., 1:-1]
    m2zyy = mix(m2, zyy)
    bzx = mix(B, (zn[..., 2:] - zn[..., :-2])[..., 1:-1, :] / 2)
    azy = mix(A, (zn[..., 2:, :] - zn[..., :-2, :])[..., 1:-1] / 2)
    return {"rx": sq(rx), "dx": sq(z[..., 1:] - z[..., :-1]), "ax": sq(z[..., 1:] - z[..., :-1] - rx),
            "ry": sq(ry), "dy": sq(z[..., 1:, :] - z[..., :-1, :]), "by": sq(z[..., 1:, :] - z[..., :-1, :] - ry),
            "z": sq(z), "r4": sq(zxx - m2zyy), "zxx": sq(zxx), "m2zyy": sq(m2zyy),
            "rc": sq(bzx - azy), "bzx": sq(bzx), "azy": sq(azy)}


def relative(sums: dict, residual: str, a: str, b: str, mask: torch.Tensor | None = None) -> float:
    """|r| / (|a| + |b|) over the positions in ``mask`` (all by default), for r = a - b: 0 when the relation holds
    exactly, about 0.71 for unrelated terms of equal size, 1 for opposite ones or when one term dwarfs the other
    (``ratio`` tells which)."""
    pick = (lambda t: t[mask]) if mask is not None else (lambda t: t)
    r, x, y = (pick(sums[k]).sum().sqrt().item() for k in (residual, a, b))
    return r / max(x + y, 1e-30)


def ratio(sums: dict, a: str, b: str) -> float:
    """|a| / |b| over all positions: how the two sides of a relation compare in size."""
    return (sums[a].sum() / sums[b].sum().clamp_min(1e-300)).sqrt().item()


def matrix_facts(params: dict) -> dict:
    """App. A's assumption (a), numerically: condition numbers of A and B (B invertible in float32 when its
    condition number is below 1 / eps32), and the eigenvalues of M = A B^-1, which decide the type of Eq. 4 along
    each eigen-direction: z_xx = lambda^2 z_yy is a wave equation (hyperbolic) for real lambda and a Laplace
    equation (elliptic, an anisotropic Laplacian proper) only for purely imaginary lambda."""
    A, B = params["A"].detach().double().cpu(), params["B"].detach().double().cpu()
    sa, sb = torch.linalg.svdvals(A), torch.linalg.svdvals(B)
    lam = torch.linalg.eigvals(torch.linalg.solve(B.T, A.T).T)
    tol = 1e-9 * lam.abs().max().clamp_min(1e-30)
    return {"cond_A": (sa[0] / sa[-1]).item(), "cond_B": (sb[0] / sb[-1]).item(), "min_singular_B": sb[-1].item(),
            "B_invertible": bool(sb[0] / sb[-1] < 1 / torch.finfo(torch.float32).eps),
            "M_real_eigenvalues": (lam.imag.abs() <= tol).double().mean().item(),
            "M_imaginary_eigenvalues": ((lam.real.abs() <= tol) & (lam.imag.abs() > tol)).double().mean().item()}


# ---------------------------------------------------------------------------------------------------------------------
# App. E.2: the embedding space of q
# ---------------------------------------------------------------------------------------------------------------------

def saturation(x: torch.Tensor) -> torch.Tensor:
    """Mean HSV saturation (max - min) / max over the pixels of images x (B, 3, H, W) -> (B,); black counts 0."""
    hi, lo = x.amax(1), x.amin(1)
    return ((hi - lo) / hi.clamp_min(1e-8)).flatten(1).mean(1)


def contrast(x: torch.Tensor) -> torch.Tensor:
    """Standard deviation of the luma (Rec. 601) over each image's pixels, (B, 3, H, W) -> (B,)."""
    luma = torch.einsum("c,bchw->bhw", x.new_tensor([0.299, 0.587, 0.114]), x)
    return luma.flatten(1).std(1)


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference between horizontal and vertical neighbours, (B, 3, H, W) -> (B,): high for noise."""
    return ((x[..., 1:] - x[..., :-1]).abs().flatten(1).mean(1) + (x[..., 1:, :] - x[..., :-1, :]).abs().flatten(1)
            .mean(1)) / 2


def correlation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of each pair of images (B, ...) over their pixels -> (B,)."""
    a, b = a.flatten(1) - a.flatten(1).mean(1, keepdim=True), b.flatten(1) - b.flatten(1).mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-12)


def pca(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Principal components of embeddings q (N, C): ``(mean (C,), components (K, C), variances (K,))`` with
    K = min(N, C), rows sorted by decreasing variance (the covariance's eigenvalues, unbiased)."""
    if q.dim() != 2 or len(q) < 2:
        raise ValueError(f"q: expected at least 2 embeddings (N, C), got {tuple(q.shape)}")
    mean = q.mean(0)
    _, s, vh = torch.linalg.svd(q - mean, full_matrices=False)
    return mean, vh, s.square() / (len(q) - 1)


def pca_reconstruct(q: torch.Tensor, mean: torch.Tensor, components: torch.Tensor, k: int) -> torch.Tensor:
    """q (N, C) projected onto its top-``k`` principal components (Fig. 15): mean + (q - mean) V_k^T V_k."""
    v = components[:k]
    return mean + (q - mean) @ v.T @ v


def gaussian_samples(q: torch.Tensor, n: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """n samples (n, C) of the Gaussian with the mean and (unbiased) covariance of embeddings q (N, C) (Fig. 12).

    Drawn as mean + e (q - mean) / sqrt(N - 1) with e ~ N(0, I_N): exactly that covariance, also when it is
    singular (N <= C), with no factorisation."""
    if q.dim() != 2 or len(q) < 2:
        raise ValueError(f"q: expected at least 2 embeddings (N, C), got {tuple(q.shape)}")
    mean = q.mean(0)
    e = torch.randn(n, len(q), generator=generator, dtype=q.dtype, device=q.device)
    return mean + e @ (q - mean) / math.sqrt(len(q) - 1)


# ---------------------------------------------------------------------------------------------------------------------
# §4's linear baseline: the best linear code with as many numbers as q, a PCA of the training images' pixels
#
#     x ≈ mean + P Pᵀ (x − mean),   P (D, k): the top-k eigenvectors of the pixels' covariance, D = 3·H·W
# ---------------------------------------------------------------------------------------------------------------------

PCA_MAX_DIM = 16384  # the largest D whose exact D x D float64 covariance we form (2 GiB); 3·256² is 196608


class PCATooLarge(ValueError):
    """Images with more than ``PCA_MAX_DIM`` numbers: their exact covariance is too large to form."""


def check_pca_size(d: int, k: int) -> None:
    """Raise a ValueError unless a ``k``-component PCA of vectors of ``d`` numbers can be fitted here: k <= d, and
    d <= ``PCA_MAX_DIM`` (else ``PCATooLarge``)."""
    if d > PCA_MAX_DIM:
        raise PCATooLarge(f"images of D = {d} numbers are too large for an exact PCA (a D x D covariance; "
                          f"D <= {PCA_MAX_DIM} only)")
    if k > d:
        raise ValueError(f"k: {k} components, but the images have only D = {d} numbers")


def fit_pca(images, k: int, *, max_images: int = 20000) -> dict:
    """A ``k``-component PCA of the flattened images (D = 3·H·W numbers each) of ``images``, an iterable of batches
    (B, 3, H, W) or of loader batches ``{"images": ...}``, from its first ``max_images`` images.

    One batch at a time, the sum and the D x D second moment of the images (about the first batch's mean, which
    keeps the subtraction below well-conditioned) accumulate in float64; the covariance's eigenvectors come from
    ``torch.linalg.eigh``. Returns ``mean`` (D,), ``basis`` (D, k) (orthonormal columns, decreasing variance) and
    ``variances`` (k,) (each component's variance), all float64, ``explained`` (the fraction of the total variance in
    the k components) and ``images`` (how many were used). Needs at least k + 1 images (n images span at most n - 1
    directions about their mean)."""
    if k < 1:
        raise ValueError(f"k: a PCA needs at least 1 component, got k={k}")
    if max_images < k + 1:
        raise ValueError(f"max_images: a {k}-component PCA needs at least k + 1 = {k + 1} images, got {max_images}")
    n, shift, total, moment = 0, None, None, None
    for batch in images:
        x = (batch["images"] if isinstance(batch, dict) else batch)[: max_images - n].flatten(1).double()
        if not len(x):
            continue
        if shift is None:
            check_pca_size(x.shape[1], k)
            shift, total, moment = x.mean(0), x.new_zeros(x.shape[1]), x.new_zeros(x.shape[1], x.shape[1])
        elif x.shape[1] != len(shift):
            raise ValueError(f"images: every image must have D = {len(shift)} numbers, got a batch with {x.shape[1]}")
        x = x - shift
        total += x.sum(0)
        moment.addmm_(x.T, x)
        n += len(x)
        if n >= max_images:
            break
    if n < k + 1:
        raise ValueError(f"images: a {k}-component PCA needs at least k + 1 = {k + 1} images, got {n}")
    centre = total / n
    covariance = moment.addr_(centre, centre, alpha=-n).div_(n - 1)  # in place: D x D may be 2 GiB
    values, vectors = torch.linalg.eigh(covariance)  # ascending
    return {"mean": shift + centre, "basis": vectors[:, -k:].flip(1), "variances": values[-k:].flip(0),
            "explained": (values[-k:].sum() / values.sum()).item(), "images": n}


def pca_reconstruct_images(x: torch.Tensor, pca: dict) -> torch.Tensor:
    """Images x (B, 3, H, W) reconstructed from their k PCA coefficients, mean + P Pᵀ (x − mean) over the flattened
    pixels (``pca`` from ``fit_pca``); computed in float64, returned in x's dtype, not clamped to [0, 1] (as the
    model's output is not; ``psnr`` clamps both alike)."""
    mean, basis = pca["mean"].to(x.device), pca["basis"].to(x.device)
    if x[0].numel() != len(mean):
        raise ValueError(f"x: images of {x[0].numel()} numbers, but the PCA was fitted on images of {len(mean)}")
    flat = x.flatten(1).double() - mean
    return (mean + flat @ basis @ basis.T).reshape(x.shape).to(x.dtype)


# ---------------------------------------------------------------------------------------------------------------------
# Gathering from a model and a loader
# ---------------------------------------------------------------------------------------------------------------------

def batches(loader, *, limit: int | None = None, description: str = "images"):
    """The image batches x (B, 3, H, W) of ``loader``, at most ``limit`` images in all, under a progress bar."""
    try:
        total = len(loader.dataset)
    except (AttributeError, TypeError):  # a stream has no length
        total = None
    if limit is not None:
        total = limit if total is None else min(total, limit)
    seen = 0
    columns = (TextColumn(f"[bold]{description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task(description, total=total)
        for batch in loader:
            x = batch["images"][: None if limit is None else limit - seen]
            seen += len(x)
            progress.advance(task, len(x))
            yield x
            if limit is not None and seen >= limit:
                break
    if not seen:
        raise ValueError("the data gave no images")


def images_of(model, q: torch.Tensor, *, chunk: int = 32) -> torch.Tensor:
    """The images (B, 3, H, W) in [0, 1] that ``model`` decodes from embeddings q (B, C): expand, then upsample
    (``chunk`` embeddings at a time, which bounds the upsampler's memory)."""
    return torch.cat([model.decode(model.expand(c)).clamp(0, 1) for c in q.split(chunk)])


@torch.no_grad()
def curvature_stats(model, loader, *, top: int = 16, limit: int | None = None) -> dict[str, torch.Tensor]:
    """``rank_channels`` of ``model.maps(x)`` for every image of ``loader``: (N, top) tensors (Fig. 5)."""
    model.eval()
    parts = [rank_channels(model.maps(x), top=top) for x in batches(loader, limit=limit, description="curvature")]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def curvature_summary(stats: dict[str, torch.Tensor]) -> dict:
    """Medians over images of the top-1 and the top-K channels' score, kappa_+ and kappa_- (Fig. 5's axes)."""
    return {"images": len(stats["score"]), "top": stats["score"].shape[1],
            "score_top1_median": stats["score"][:, 0].median().item(),
            "score_topk_median": stats["score"].median().item(),
            "kappa_plus_topk_median": stats["kappa_plus"].median().item(),
            "kappa_minus_topk_median": stats["kappa_minus"].median().item()}


def finola_params(model) -> tuple[dict, dict | None]:
    """The FINOLA matrices of a model and the statistics its normalization uses at inference (None: per position)."""
    stats = None
    if getattr(model.config, "norm", "layer") == "moving-average" and model.use_running_stats:
        stats = {"mean": model.running_mean, "var": model.running_var}
    return {k: v.detach() for k, v in model.finola.items()}, stats


@torch.no_grad()
def pde_study(model, loader, *, out: Path, limit: int | None = None) -> dict:
    """Eq. 2's residuals on ``model.maps(x)`` and Eq. 4's relation under its assumptions (``pde_sums``,
    ``matrix_facts``) over ``loader``; writes ``pde.png`` (per-position Eq. 2 residuals, singular values).

    ``eq2_x_relative`` / ``eq2_y_relative``: Eq. 2's relative residual where the map is not Eq. 1 by construction
    (``eq2_exact_part_relative``: where it is, right of / below q on its row / column; a check, ~1e-7);
    ``step_relative``: |Δx z| / |z|, how large one grid step is against the state (the continuum needs it small);
    ``eq4_relative`` / ``integrability_relative`` with the ratio of their two sides; ``matrix_facts``; the
    one-way wave reading (``waves``): each quadrant's ``wave_<quadrant>_relative``, the speeds' ``speed_facts``, and
    every speed in ``speeds.json``."""
    model.eval()
    params, stats = finola_params(model)
    sums: dict[str, torch.Tensor] = {}
    m2, decompositions, waves_sums = eq4_matrix(params), waves.speeds(params), {}
    for x in batches(loader, limit=limit, description="pde"):
        z = model.maps(x)
        for k, v in pde_sums(params, z, stats=stats, m2=m2.to(x.device)).items():
            sums[k] = sums[k] + v.cpu() if k in sums else v.cpu()
        for quadrant, terms in waves.wave_sums(z, decompositions).items():
            kept = waves_sums.setdefault(quadrant, {})
            for k, v in terms.items():
                kept[k] = kept[k] + v if k in kept else v
    r0, c0 = model.origin
    H, W = sums["z"].shape
    exact_x = torch.zeros(H, W - 1, dtype=torch.bool)
    exact_x[r0, c0:] = True  # right of q on q's row: Eq. 1 holds exactly there (finola.pde_residual)
    exact_y = torch.zeros(H - 1, W, dtype=torch.bool)
    exact_y[r0:, c0] = True
    result = {"eq2_x_relative": relative(sums, "rx", "dx", "ax", ~exact_x),
              "eq2_y_relative": relative(sums, "ry", "dy", "by", ~exact_y),
              "eq2_exact_part_relative": max(relative(sums, "rx", "dx", "ax", exact_x),
                                             relative(sums, "ry", "dy", "by", exact_y)),
              "step_relative": (sums["dx"].sum() / sums["z"][:, 1:].sum()).sqrt().item(),
              "eq4_relative": relative(sums, "r4", "zxx", "m2zyy"), "eq4_sides_ratio": ratio(sums, "m2zyy", "zxx"),
              "integrability_relative": relative(sums, "rc", "bzx", "azy"),
              "integrability_sides_ratio": ratio(sums, "bzx", "azy")}
    result |= matrix_facts(params)
    masks = waves.quadrant_masks((H, W), (r0, c0))  # the hidden-waves reading: one-way waves per quadrant
    result |= {f"wave_{q}_relative": waves.wave_relative(waves_sums[q], masks[q]) if masks[q].any() else None
               for q in waves.QUADRANTS}
    result |= waves.speed_facts(decompositions, params)
    result["speeds_file"] = str(waves.save_speeds(decompositions, Path(out) / "speeds.json"))
    result["figure"] = str(plot_pde(sums, params, Path(out) / "pde.png", summary=result))
    return result



@torch.no_grad()
def embedding_study(model, loader, *, out: Path, limit: int | None = None, show: int = 4, keep: int = 128,
                    seed: int = 0) -> dict:
    """App. E.2 over the embeddings q of ``loader``'s images; writes one figure each (``show`` example rows):

    ``embedding_mean.png`` (Fig. 13 left: q faded along the line to the mean q̄, whose image the paper finds
    near-gray), ``embedding_interpolation.png`` (Fig. 14: alpha q1 + (1 - alpha) q2), ``embedding_mirror.png``
    (Fig. 13 right: the mirror 2 q̄ - q, the reflection of q through q̄; the paper's text writes 2q - q̄, which is
    the extrapolation away from q̄, shown too), ``embedding_samples.png`` (Fig. 12: samples of the Gaussian with
    the embeddings' mean and covariance) and ``embedding_pca.png`` (Fig. 15: top-K principal components, K from
    1 to all). Scores (PSNR, correlations) use the first ``keep`` images; image statistics use all of them; the
    interpolations pair the first ``show`` images with the last ``show``."""
    model.eval()
    qs, kept, last, stats = [], [], [], {"saturation": [], "contrast": [], "tv": []}
    for x in batches(loader, limit=limit, description="embeddings"):
        qs.append(model.encode(x).float())
        kept += list(x[: keep - len(kept)])
        last = (last + list(x))[-show:]
        for name, fn in (("saturation", saturation), ("contrast", contrast), ("tv", total_variation)):
            stats[name].append(fn(x))
    q, x = torch.cat(qs), torch.stack(kept)
    data = {k: torch.cat(v).mean().item() for k, v in stats.items()}
    mean, components, variances = pca(q)
    n, show = len(x), min(show, len(x))
    recon = images_of(model, q[:n])
    gray = images_of(model, mean[None])
    out, rows = Path(out), slice(0, show)
    title = f"q → q̄: saturation {saturation(gray).item():.3f} at q̄, {data['saturation']:.3f} in the data"
    mean_figure(model, x[rows], q[rows], mean, out / "embedding_mean.png", title=title)
    interpolation_figure(model, x[rows], q[rows], q[len(q) - show:], torch.stack(last),
                         out / "embedding_interpolation.png")
    mirror, literal = mirror_figure(model, x, q[:n], mean, recon, gray, out / "embedding_mirror.png", show=show)
    samples = samples_figure(model, q, recon, out / "embedding_samples.png", seed=seed)
    ks, tops = pca_figure(model, x, q[:n], mean, components, recon, out / "embedding_pca.png", show=show)

    explained = variances.cumsum(0) / variances.sum()
    return {"images": len(q), "channels": q.shape[1], "scored_images": n,
            "data_saturation": data["saturation"], "mean_q_saturation": saturation(gray).item(),
            "data_contrast": data["contrast"], "mean_q_contrast": contrast(gray).item(),
            "reconstruction_psnr_db": psnr(x, recon).mean().item(),
            "mirror_correlation": correlation(mirror - gray, recon - gray).mean().item(),
            "extrapolation_correlation": correlation(literal - gray, recon - gray).mean().item(),
            "data_tv": data["tv"], "reconstruction_tv": total_variation(recon).mean().item(),
            "samples_tv": total_variation(samples).mean().item(),
            "pca_k": ks, "pca_explained": [explained[k - 1].item() for k in ks],
            "pca_psnr_db": [psnr(x, t).mean().item() for t in tops],
            "figures": [str(out / f"embedding_{f}.png") for f in ("mean", "interpolation", "mirror", "samples", "pca")]}


def mean_figure(model, x, q, mean, path, *, title: str):
    """Fig. 13 left: each image, then its q faded along the line to the mean q̄ (alpha q + (1 - alpha) q̄)."""
    alphas = (1.0, 0.75, 0.5, 0.25, 0.0)
    fade = [images_of(model, a * q + (1 - a) * mean) for a in alphas]
    image_grid(path, by_columns([x, *fade]), col_labels=["image", *(f"α={a}" for a in alphas)], title=title)


def interpolation_figure(model, x1, q1, q2, x2, path):
    """Fig. 14: alpha q1 + (1 - alpha) q2 between the images x1 and x2 (rows paired)."""
    steps = torch.linspace(1, 0, 7).tolist()
    mixes = [images_of(model, a * q1 + (1 - a) * q2) for a in steps]
    image_grid(path, by_columns([x1, *mixes, x2]), col_labels=["image 1", *(f"α={a:.2f}" for a in steps), "image 2"],
               title="α q1 + (1 − α) q2")


def mirror_figure(model, x, q, mean, recon, gray, path, *, show: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fig. 13 right: the images of the mirror 2 q̄ - q and of the paper's literal 2 q - q̄ (returned, every q;
    the first ``show`` drawn beside the image, its reconstruction and the image of q̄)."""
    mirror, literal = images_of(model, 2 * mean - q), images_of(model, 2 * q - mean)
    columns = [x[:show], recon[:show], gray.expand(show, -1, -1, -1), mirror[:show], literal[:show]]
    image_grid(path, by_columns(columns),
               col_labels=["image", "q", "q̄", "2q̄ − q (mirror)", "2q − q̄ (paper's text)"],
               title="mirror embeddings through the mean q̄")
    return mirror, literal


def samples_figure(model, q, recon, path, *, seed: int) -> torch.Tensor:
    """Fig. 12: the images of 16 samples of the Gaussian with the embeddings' mean and covariance (returned),
    drawn under 8 reconstructions."""
    samples = images_of(model, gaussian_samples(q, 2 * 8, generator=torch.Generator().manual_seed(seed)))
    image_grid(path, [recon[:8], samples[:8], samples[8:]], row_labels=["reconstructions", "samples", "samples"],
               title="samples of N(mean q, cov q)")
    return samples


def pca_figure(model, x, q, mean, components, recon, path, *, show: int) -> tuple[list[int], list[torch.Tensor]]:
    """Fig. 15: the images of q kept to its top-K principal components, K = 1, 4, 16, ..., all; returns the Ks and
    the images of every q for each K."""
    every = len(components)
    ks = [k for k in (4 ** i for i in range(every.bit_length())) if k < every] + [every]
    tops = [images_of(model, pca_reconstruct(q, mean, components, k)) for k in ks]
    image_grid(path, by_columns([x[:show], recon[:show], *(t[:show] for t in tops)]),
               col_labels=["image", "q", *(f"top-{k}" for k in ks)], title="top-K principal components")
    return ks, tops


# ---------------------------------------------------------------------------------------------------------------------
# Figures (matplotlib's object-oriented API: no global state, no display needed)
# ---------------------------------------------------------------------------------------------------------------------

def save_figure(fig, path) -> Path:
    """Write a matplotlib figure at ``path`` (a PNG unless its suffix names another format), atomically: a
    temporary name in the same folder (made as needed), then a rename."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format=path.suffix[1:].lower() or "png")
    return path


def save_image(image, path) -> Path:
    """Write a PIL image at ``path`` in the format its suffix names (``.png``, ``.jpg``, ...), atomically as
    ``save_figure``."""
    path = Path(path)
    kind = Image.registered_extensions().get(path.suffix.lower())
    if kind is None:
        raise ValueError(f"{str(path)!r}: unknown image file extension {path.suffix!r}; use .png")
    with atomic_path(path) as tmp:
        image.save(tmp, format=kind)
    return path


def by_columns(columns: list[torch.Tensor]) -> list[torch.Tensor]:
    """Columns of images (each (n, 3, H, W)) as the rows ``image_grid`` takes."""
    return list(torch.stack(columns, 1))


def image_grid(path, rows: list[torch.Tensor], *, row_labels=None, col_labels=None, title: str = "") -> Path:
    """A PNG of rows of images (each (n, 3, H, W) in [0, 1]; all of one size) on a white mosaic, drawn as one
    image (fast at any count), with optional row and column labels."""
    from matplotlib.figure import Figure

    n, (h, w), pad = max(len(r) for r in rows), rows[0].shape[-2:], 2
    canvas = torch.ones(len(rows), n, 3, h + pad, w + pad)
    for i, row in enumerate(rows):
        canvas[i, :len(row), :, pad:, pad:] = row.detach().float().clamp(0, 1).cpu()
    mosaic = canvas.permute(0, 3, 1, 4, 2).reshape(len(rows) * (h + pad), n * (w + pad), 3)
    fig = Figure(figsize=(1.2 * n + 0.8, 1.2 * len(rows) + 0.5))
    ax = fig.subplots()
    ax.imshow(mosaic.numpy(), interpolation="nearest")
    ax.set_xticks([(w + pad) * (j + 0.5) for j in range(len(col_labels or []))], col_labels or [], fontsize=7)
    ax.set_yticks([(h + pad) * (i + 0.5) for i in range(len(row_labels or []))], row_labels or [], fontsize=7)
    ax.xaxis.tick_top()
    ax.tick_params(length=0)
    for side in ax.spines.values():
        side.set_visible(False)
    ax.set_title(title, fontsize=9)
    return save_figure(fig, path)


def plot_curvature(stats: dict[str, dict[str, torch.Tensor]], path) -> Path:
    """Fig. 5, one colour per checkpoint: the score of the rank-1..K channels (median and quartiles over images),
    and the peak positive against peak negative curvature of every image's top-K channels."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4))
    left, right = fig.subplots(1, 2)
    for label, s in stats.items():
        ranks = torch.arange(1, s["score"].shape[1] + 1).numpy()
        lo, mid, hi = torch.quantile(s["score"], torch.tensor([0.25, 0.5, 0.75]), dim=0).numpy()
        line, = left.plot(ranks, mid, marker="o", ms=3, label=label)
        left.fill_between(ranks, lo, hi, alpha=0.25, color=line.get_color())
        plus, minus = s["kappa_plus"].flatten(), -s["kappa_minus"].flatten()
        pick = torch.randperm(len(plus), generator=torch.Generator().manual_seed(0))[:20000]
        right.scatter(plus[pick].clamp_min(1e-8).numpy(), minus[pick].clamp_min(1e-8).numpy(), s=3, alpha=0.3,
                      color=line.get_color(), label=label)
    left.set(xlabel="channel rank in its image", ylabel="sqrt((κ+² + κ−²) / 2)", yscale="log",
             title="critical channels (median, quartiles)")
    right.set(xlabel="peak positive curvature κ+ (0 drawn at 1e-8)", ylabel="peak negative curvature |κ−|",
              xscale="log", yscale="log", title="top-K channels of every image")
    left.legend(fontsize=8)
    right.legend(fontsize=8, markerscale=4)
    return save_figure(fig, path)


def plot_pde(sums: dict[str, torch.Tensor], params: dict, path, *, summary: dict) -> Path:
    """Per-position relative residual of Eq. 2 along x and y (0 where Eq. 1 holds exactly, e.g. right of q on its
    row), and the singular values of the FINOLA matrices."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(14, 4), layout="constrained")
    ax_x, ax_y, ax_s = fig.subplots(1, 3)
    for ax, (r, d, w), title, xlabel, ylabel in (
            (ax_x, ("rx", "dx", "ax"), "|Δx z − A z_n| / (|Δx z| + |A z_n|)", "x (step x → x+1)", "y"),
            (ax_y, ("ry", "dy", "by"), "|Δy z − B z_n| / (|Δy z| + |B z_n|)", "x", "y (step y → y+1)")):
        rel = sums[r].sqrt() / (sums[d].sqrt() + sums[w].sqrt()).clamp_min(1e-30)
        im = ax.imshow(rel.numpy(), cmap="magma", vmin=0)
        fig.colorbar(im, ax=ax, shrink=0.8)
        ax.set(title=f"Eq. 2 residual: {title}", xlabel=xlabel, ylabel=ylabel,
               xticks=range(rel.shape[1]), yticks=range(rel.shape[0]))
    for k, w in params.items():
        ax_s.semilogy(torch.linalg.svdvals(w.double().cpu()).numpy(), label=k)
    ax_s.set(xlabel="index", ylabel="singular value",
             title=f"cond(B) = {summary['cond_B']:.3g}; Eq. 4 relative residual {summary['eq4_relative']:.3f}")
    ax_s.legend(fontsize=8)
    return save_figure(fig, path)
