"""Readout: how much of the image each stage of a FINOLA model still holds (``eval.py readout``).

A stage holds at least what a linear map can read back from it. For every stage (the encoder's stem and blocks,
its output map, q, the FINOLA map), the ridge regression from the stage's features to the pixels is fitted on
training crops and scored on the evaluation images, next to the PCA with as many numbers as q (``pca_db``). A model
whose q reads out no better than its own reconstruction is limited by what reaches q, not by FINOLA or the decoder;
the stage at which the read-out falls below the PCA is where the encoder loses what a linear code keeps
(EXPERIMENTS.md, "FINOLA against the PCA of its size").
"""
from __future__ import annotations

import torch

import analysis

MAX_FEATURES = 8192  # a stage with more numbers is skipped: its (D, D) normal equations would not fit


def stage_features(model, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """(B, D) features of images ``x`` at each stage of FINOLA model ``model``, in order: the encoder's ``stem`` and
    each of its ``blocks`` (when it has them; a block returning (map, tokens) gives its map), its output map, q and
    the FINOLA map."""
    encoder, out, hooks = model.encoder, {}, []
    stages = ([("stem", encoder.stem)] if hasattr(encoder, "stem") else []) + \
        [(f"block {i}", block) for i, block in enumerate(getattr(encoder, "blocks", []))]
    for name, module in stages:
        def keep(_, __, output, name=name):
            out[name] = (output[0] if isinstance(output, tuple) else output).flatten(1)
        hooks.append(module.register_forward_hook(keep))
    try:
        fmap, _ = encoder(model.pixels(x, size=model.image_size))
    finally:
        for hook in hooks:
            hook.remove()
    out["encoder map"] = fmap.flatten(1)
    out["q"] = model.pool(fmap)
    out["FINOLA map"] = model.expand(out["q"]).flatten(1)
    return out


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
    """Per stage: {"stage", "numbers", "psnr_db"}: the PSNR on ``x_val`` (B, 3, H, W) of the pixels read linearly
    out of that stage (:class:`Ridge`, fitted on ``train_batches``, an iterable of image batches in [0, 1]); stages
    with more than ``MAX_FEATURES`` numbers get ``psnr_db`` None."""
    analysis.check_pca_size(x_val[0].numel(), 1)
    model.eval()
    fits: dict[str, Ridge | None] = {}
    for x in train_batches:
        for name, f in stage_features(model, x).items():
            if name not in fits:
                fits[name] = Ridge(ridge) if f.shape[1] <= MAX_FEATURES else None
            if fits[name] is not None:
                fits[name].add(f, x.flatten(1))
    if not fits:
        raise ValueError("readout: the training data gave no images")
    val = stage_features(model, x_val)
    return [{"stage": name, "numbers": val[name].shape[1],
             "psnr_db": None if fit is None else
             round(analysis.psnr(x_val, fit.predict(val[name]).reshape(x_val.shape)).mean().item(), 3)}
            for name, fit in fits.items()]
