"""Readout: how much of the image each stage of a FINOLA model still holds (``eval.py readout``).

A stage holds at least what a linear map can read back from it. For every stage (the encoder's stem and blocks,
its output map, q, the FINOLA map), the ridge regression from the stage's features to the pixels is fitted on
training crops and scored on the evaluation images, next to the PCA with as many numbers as q (``pca_db``). A model
whose q reads out no better than its own reconstruction is limited by what reaches q, not by FINOLA or the decoder;
the stage at which the read-out falls below the PCA is where the encoder loses what a linear code keeps
(EXPERIMENTS.md, "FINOLA against the PCA of its size"). Each map stage also gets its layout's linear twin
(:func:`layout_pca`): a stage that reads out far below it has the room to keep more and has not learnt to.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

import analysis

MAX_FEATURES = 8192  # a stage with more numbers is skipped: its (D, D) normal equations would not fit


def stage_features(model, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The features of images ``x`` at each stage of FINOLA model ``model``, in order: the encoder's ``stem`` and
    each of its ``blocks`` (when it has them; a block returning (map, tokens) gives its map), its output map (maps:
    (B, C, h, w)), q (B, D) and the FINOLA map (B, C, h, w)."""
    encoder, out, hooks = model.encoder, {}, []
    stages = ([("stem", encoder.stem)] if hasattr(encoder, "stem") else []) + \
        [(f"block {i}", block) for i, block in enumerate(getattr(encoder, "blocks", []))]
    for name, module in stages:
        def keep(_, __, output, name=name):
            out[name] = output[0] if isinstance(output, tuple) else output
        hooks.append(module.register_forward_hook(keep))
    try:
        fmap, _ = encoder(model.pixels(x, size=model.image_size))
    finally:
        for hook in hooks:
            hook.remove()
    out["encoder map"] = fmap
    out["q"] = model.pool(fmap)
    out["FINOLA map"] = model.expand(out["q"])
    return out


# A map stage of C channels on an h x w grid codes each of the image's h·w blocks (H/h x W/w pixels) with C numbers,
# receptive fields and tokens aside. Its linear twin does exactly that: one PCA basis of C components over all the
# blocks of the training crops. It is what such a layout keeps for free, not a bound on what a network can keep.
def blocks(x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Images (B, 3, H, W) → their (B·h·w, 3·(H/h)·(W/w)) non-overlapping blocks on a ``grid`` = (h, w), row-major."""
    size = (x.shape[-2] // grid[0], x.shape[-1] // grid[1])
    return F.unfold(x, size, stride=size).transpose(1, 2).flatten(0, 1)


def unblocks(b: torch.Tensor, grid: tuple[int, int], shape) -> torch.Tensor:
    """The inverse of :func:`blocks`: blocks back to images of ``shape`` (B, 3, H, W)."""
    size = (shape[-2] // grid[0], shape[-1] // grid[1])
    cols = b.reshape(shape[0], grid[0] * grid[1], -1).transpose(1, 2)
    return F.fold(cols, tuple(shape[-2:]), size, stride=size)


def layout_pca(train_batches, x_val: torch.Tensor, channels: int, grid: tuple[int, int]) -> float | None:
    """PSNR on ``x_val`` of the images coded block by block on ``grid`` with ``channels`` PCA components each (one
    basis fitted on the blocks of ``train_batches``); ``math.inf`` when a block has no more than ``channels`` numbers
    (the layout loses nothing linearly), None when the grid does not tile the images."""
    h, w = x_val.shape[-2:]
    if h % grid[0] or w % grid[1]:
        return None
    if 3 * (h // grid[0]) * (w // grid[1]) <= channels:
        return math.inf
    pca = analysis.fit_pca((blocks(x, grid) for x in train_batches), channels, max_images=10 ** 9)
    coded = unblocks(analysis.pca_reconstruct_images(blocks(x_val, grid), pca), grid, x_val.shape)
    return round(analysis.psnr(x_val, coded).mean().item(), 3)


class Ridge:
    """Ridge regression from features f (B, D) to targets y (B, P), fitted from streamed batches through the
    centred normal equations in float64: W = (Fᶜᵀ Fᶜ + λ·mean(diag) I)⁻¹ Fᶜᵀ Yᶜ (λ relative to the features' own
    scale)."""

    def __init__(self, ridge: float = 1e-2):
        self.ridge, self.n, self.sums = ridge, 0, None

    def add(self, f: torch.Tensor, y: torch.Tensor) -> None:
        f, y = f.double(), y.double()
        parts = (f.sum(0), y.sum(0), f.T @ f, f.T @ y)
        self.sums = parts if self.sums is None else tuple(a + b for a, b in zip(self.sums, parts))
        self.n += len(f)

    def fit(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(W (D, P), feature mean (D,), target mean (P,))."""
        if self.n < 2:
            raise ValueError(f"Ridge: {self.n} samples; need at least 2")
        sf, sy, ff, fy = self.sums
        mf, my = sf / self.n, sy / self.n
        gram = ff - self.n * torch.outer(mf, mf)
        gram.diagonal().add_(self.ridge * gram.diagonal().mean().clamp(min=1e-12))
        return torch.linalg.solve(gram, fy - self.n * torch.outer(mf, my)), mf, my

    def predict(self, f: torch.Tensor) -> torch.Tensor:
        w, mf, my = self.fit()
        return ((f.double() - mf) @ w + my).float()


@torch.no_grad()
def readout(model, train_batches, x_val: torch.Tensor, *, ridge: float = 1e-2) -> list[dict]:
    """Per stage: {"stage", "numbers", "psnr_db", "layout_pca_db", "layout_lossless"}: the PSNR on ``x_val`` (B, 3,
    H, W) of the pixels read linearly out of that stage (:class:`Ridge`, fitted on ``train_batches``, a list of image
    batches in [0, 1]; stages with more than ``MAX_FEATURES`` numbers get None) and, for a map stage, of its
    layout's linear twin (:func:`layout_pca`; None for q, where the grid does not tile and where the layout is
    lossless, which ``layout_lossless`` says)."""
    analysis.check_pca_size(x_val[0].numel(), 1)
    model.eval()
    fits: dict[str, Ridge | None] = {}
    for x in train_batches:
        for name, f in stage_features(model, x).items():
            if name not in fits:
                fits[name] = Ridge(ridge) if f[0].numel() <= MAX_FEATURES else None
            if fits[name] is not None:
                fits[name].add(f.flatten(1), x.flatten(1))
    if not fits:
        raise ValueError("readout: the training data gave no images")
    val, rows = stage_features(model, x_val), []
    for name, fit in fits.items():
        f = val[name]
        twin = layout_pca(train_batches, x_val, f.shape[1], tuple(f.shape[-2:])) if f.dim() == 4 else None
        rows.append({"stage": name, "numbers": f[0].numel(),
                     "psnr_db": None if fit is None else
                     round(analysis.psnr(x_val, fit.predict(f.flatten(1)).reshape(x_val.shape)).mean().item(), 3),
                     "layout_pca_db": None if twin == math.inf else twin, "layout_lossless": twin == math.inf})
    return rows
