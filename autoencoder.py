"""Vanilla FINOLA's network (§2, Fig. 1, App. B, Table 10): an encoder, attentional pooling to q, ``finola.expand``
to a map, an upsampler back to the image; trained with pixel MSE. The recurrence and its parts are ``finola.py``'s.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from finola import AttentionPool, ConvUpsampler, LinearUpsampler, expand, expand_paths, init, q_origin, running_stats
from layers import IMAGENET_MEAN, IMAGENET_STD, EncoderModel, PixelNorm, frozen_fields


# Which of Table 10's upsamplers decodes the vanilla FINOLA map: "conv" (ConvUpsampler, the paper's) or "linear"
# (LinearUpsampler, ours for the small preset: at 32^2 the whole model's step runs faster on a CPU, and the same
# minutes reach a higher PSNR, EXPERIMENTS.md).
UPSAMPLERS = ("conv", "linear")


# What the upsampler's last conv predicts. The paper says only "follow VQGAN", whose decoder predicts images scaled
# to [-1, 1]. "normalized": the image as the encoder sees it, (x - mean) / std, mapped back to [0, 1] by a fixed
# affine map, so a fresh network starts at the data's mean colour; "pixels": the image in [0, 1] directly, which
# starts ~0.45 away from the target and, with AdamW's ~lr-sized steps, spends hundreds of steps moving the last
# conv's bias there (EXPERIMENTS.md, the reconstruction ladder). The loss is pixel MSE either way.
OUTPUTS = ("pixels", "normalized")


@dataclass(frozen=True, kw_only=True)
class FinolaConfig:
    """The vanilla FINOLA network (§2, Tables 2, 10, 12). Paper defaults: 256^2 images, MF-W2880, C = 3072."""
    channels: int = 3072                    # C: the latent channels of q and of the FINOLA map (Table 2a)
    paths: int = 1                          # M: q holds M vectors of C, grown alike and summed (multi-path; 1: paper)
    grid: tuple = (16, 16)                  # FINOLA map size
    q_position: str = "center"              # App. E.1
    norm: str = "layer"                     # "layer" (Eq. 1) or "moving-average" (§4's ablation)
    momentum: float = 0.1                   # of the running statistics, for norm="moving-average"
    heads: int = 8                          # of the attentional pooler
    pool_positions: tuple = ()              # ours: the encoder map's (h, w), learned key positions (AttentionPool)
    upsampler: str = "conv"                 # see UPSAMPLERS (Table 10)
    widths: tuple = (512, 256, 256, 128, 128)  # Table 10, upsampler="conv"
    patch: int = 16                         # Table 10, upsampler="linear": each cell's patch side
    mean: tuple = IMAGENET_MEAN  # input normalization of [0, 1] images for the encoder (PixelNorm)
    std: tuple = IMAGENET_STD
    output: str = "pixels"                  # what the upsampler predicts: see OUTPUTS ("pixels": files before it)

    def __post_init__(self):
        if self.norm not in ("layer", "moving-average"):
            raise ValueError(f"norm: expected 'layer' or 'moving-average', got {self.norm!r}")
        if self.upsampler not in UPSAMPLERS:
            raise ValueError(f"upsampler: expected one of {list(UPSAMPLERS)}, got {self.upsampler!r}")
        if self.output not in OUTPUTS:
            raise ValueError(f"output: expected one of {sorted(OUTPUTS)}, got {self.output!r}")
        if self.paths < 1 or (self.paths > 1 and self.norm != "layer"):
            raise ValueError(f"paths: expected 1, or more with norm='layer', got {self.paths} with {self.norm!r}")
        q_origin(self.q_position, self.grid)
        frozen_fields(self, **{k: tuple(getattr(self, k))
                               for k in ("grid", "widths", "mean", "std", "pool_positions")})


class Finola(EncoderModel):
    """Encoder -> attentional pooling -> q -> ``expand`` -> upsampler -> image (Fig. 1), trained with pixel MSE.

    Takes images in [0, 1] (B, 3, H, W) with H = W = grid * upsampler scale and returns the reconstruction in the
    same range (not clamped). ``encoder(x)`` must return ``(feature_map, tokens)``. The FINOLA matrices live in
    ``self.finola`` and go through this file's pure functions.
    """

    arch = "finola"  # its name in weights files (weights.architectures)

    Config = FinolaConfig

    def __init__(self, encoder: nn.Module, config: FinolaConfig):
        super().__init__()
        self.config = config
        self.encoder = encoder
        self.latent = config.channels * config.paths  # the numbers in q
        self.pool = AttentionPool(encoder.out_channels, self.latent, heads=config.heads,
                                  positions=config.pool_positions)
        self.finola = nn.ParameterDict({k: nn.Parameter(v) for k, v in init(config.channels).items()})
        self.upsampler = (ConvUpsampler(config.channels, config.widths) if config.upsampler == "conv"
                          else LinearUpsampler(config.channels, patch=config.patch))
        self.origin = q_origin(config.q_position, config.grid)
        self.image_size = tuple(g * self.upsampler.scale for g in config.grid)
        self.pixels = PixelNorm(config.mean, config.std)
        if config.norm == "moving-average":
            self.register_buffer("running_mean", torch.zeros(()))
            self.register_buffer("running_var", torch.ones(()))
            self.use_running_stats = True  # at inference; False normalizes per position as in training (§4)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """q (B, M C) of images x in [0, 1] (M = ``paths``, 1 in the paper)."""
        fmap, _ = self.encoder(self.pixels(x, size=self.image_size))
        return self.pool(fmap)

    @contextlib.contextmanager
    def per_position_norm(self):
        """Within the block, a norm="moving-average" model normalizes per position at inference too, as it does in
        training (§4's "Is normalization necessary?"); the previous setting comes back however the block ends."""
        before = getattr(self, "use_running_stats", False)
        self.use_running_stats = False
        try:
            yield self
        finally:
            self.use_running_stats = before

    def expand(self, q: torch.Tensor) -> torch.Tensor:
        """The FINOLA map (B, C, *grid) of q (with paths M > 1, the sum of its M vectors' maps); with
        norm="moving-average", running statistics at inference."""
        params = dict(self.finola)
        if self.config.norm == "layer":
            return expand_paths(params, q, paths=self.config.paths, size=self.config.grid, origin=self.origin)
        if not self.training and self.use_running_stats:
            stats = {"mean": self.running_mean, "var": self.running_var}
            return expand(params, q, size=self.config.grid, origin=self.origin, stats=stats)
        z = expand(params, q, size=self.config.grid, origin=self.origin)
        if not self.training:
            return z
        new = running_stats(z, {"mean": self.running_mean, "var": self.running_var}, momentum=self.config.momentum)
        self.running_mean.copy_(new["mean"])
        self.running_var.copy_(new["var"])
        return z

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """The image in [0, 1] (not clamped) of a map z (B, C, *grid)."""
        y = self.upsampler(z)
        return self.pixels.inverse(y) if self.config.output == "normalized" else y

    def maps(self, x: torch.Tensor) -> torch.Tensor:
        """The FINOLA map (B, C, *grid) the model builds for images x (what the analyses of eval.py look at)."""
        return self.expand(self.encode(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.expand(self.encode(x)))


# Spectrally weighted pixel MSE (ours; --spectral-loss α). With u_k, λ_k the K = M·C leading principal directions and
# variances of the training crops and e = y − x the error, the loss is
#
#     L = mean over pixels of  e² + Σ_k (w_k − 1)(u_kᵀ e)²,   w_k = (λ_K / λ_k)^α ≤ 1 (1 along the other directions).
#
# The plain MSE (α = 0, the paper's) pulls on each direction by its variance, so a model learns the image's
# components from the largest down and the low-variance ones that a K-number code must also hold come last (the small
# preset at 80 epochs missed 1.4 % of the variance along directions 16–64, 29 % along 64–128 and 91 % along 128–256:
# like a PCA of ~100 components; EXPERIMENTS.md). Weighting them closer together speeds that up. For 0 ≤ α < 1 the
# weighted variances w_k λ_k = λ_K^α λ_k^(1−α) keep their order and stay at or above every λ beyond K, so the best
# linear code of K numbers is the same PCA: the target does not change, only how hard each part of it pulls.
class SpectralMSE(nn.Module):
    """Pixel MSE with the error's components along the K leading principal directions of the training images
    weighted by (λ_K / λ_k)^α (the equation above). ``pca`` from ``analysis.fit_pca`` (``basis`` (D, K), ``variances``
    (K,)). Its buffers are not persistent: the loss belongs to a run, not to the weights."""

    def __init__(self, pca: dict, alpha: float):
        super().__init__()
        if not 0 <= alpha < 1:
            raise ValueError(f"alpha: expected 0 <= alpha < 1 (the weighted variances keep their order), got {alpha}")
        variances = pca["variances"]
        self.alpha = alpha
        self.register_buffer("basis", pca["basis"].float(), persistent=False)
        self.register_buffer("excess", (variances[-1] / variances).pow(alpha).float() - 1, persistent=False)

    def forward(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        e = (y - x).flatten(1)
        if e.shape[1] != len(self.basis):
            raise ValueError(f"y, x: images of {e.shape[1]} numbers, but the spectrum was fitted on {len(self.basis)}")
        along = e @ self.basis                                   # (B, K): u_kᵀ e
        return (e.square().sum(1) + along.square() @ self.excess).mean() / e.shape[1]
