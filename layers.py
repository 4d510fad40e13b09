"""Layers every model shares: the encoders' input convention (``PixelNorm``), the contract of a model built on an
encoder (``EncoderModel``, ``frozen_fields``) and ViT's pre-norm transformer block (``TransformerBlock``,
``init_vit``), used by masked FINOLA's upsampler, the classifier's tran-1 / tran-4 and MAE. Torch only.
"""
from __future__ import annotations

from dataclasses import asdict

import torch
import torch.nn.functional as F
from torch import nn


# ---------------------------------------------------------------------------------------------------------------------
# The input convention: [0, 1] RGB images normalized by ImageNet's statistics (every model here feeds its encoder so)
# ---------------------------------------------------------------------------------------------------------------------
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class PixelNorm(nn.Module):
    """``(x - mean) / std`` per channel of (B, C, H, W) images in [0, 1]; ``inverse`` maps back. The one place where
    FINOLA, the masked models, the classifier, DETR and MAE normalize what their encoder sees; its buffers are not saved
    (the statistics live in each model's config)."""

    def __init__(self, mean: tuple = IMAGENET_MEAN, std: tuple = IMAGENET_STD):
        super().__init__()
        if len(mean) != len(std) or min(std) <= 0:
            raise ValueError(f"std: expected {len(mean)} positive values to go with mean={tuple(mean)}, got {tuple(std)}")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def check(self, x: torch.Tensor, size: tuple | None = None) -> torch.Tensor:
        """``x`` itself, or a clear error when it is not (B, C, H, W) images (of ``size`` (H, W) when given)."""
        c = self.mean.shape[1]
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != c or (
                size is not None and tuple(x.shape[-2:]) != tuple(size)):
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            want = f"{size[0]}, {size[1]}" if size is not None else "H, W"
            raise ValueError(f"x: expected images (B, {c}, {want}), got {shape}")
        return x

    def forward(self, x: torch.Tensor, *, size: tuple | None = None) -> torch.Tensor:
        return (self.check(x, size) - self.mean) / self.std

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return y * self.std + self.mean


class EncoderModel(nn.Module):
    """The contract of every model built on an encoder (FINOLA, Masked-FINOLA-E/B, the classifier, DETR):

    ``Model(encoder, config)`` builds it from an encoder (``encoder(x)`` -> (map, tokens), ``encoder.out_channels``)
    and its frozen keyword-only ``Model.Config``; ``model.config_dict()`` is that config as a plain JSON-able dict with
    the encoder's own config under "encoder" (a weights file adds the encoder's arch, "encoder_arch");
    ``Model.from_config(d, encoder=...)`` is its inverse on an encoder rebuilt from ``split(d)`` (weights.build does
    both). Keys of files written before this contract are read through ``RENAMED`` (old key -> new key, or None:
    dropped)."""

    Config: type
    RENAMED: dict = {"encoder_channels": None}  # the encoder's width: its own config says it

    def config_dict(self) -> dict:
        return {**asdict(self.config), "encoder": self.encoder.config_dict()}

    @classmethod
    def split(cls, config: dict) -> tuple[dict, dict, str]:
        """(the model's own fields, the encoder's config, the encoder's arch: a file without one holds a
        Mobile-Former) of a saved config."""
        fields = {cls.RENAMED.get(key, key): value for key, value in config.items()}
        fields.pop(None, None)
        encoder_config, encoder_arch = fields.pop("encoder"), fields.pop("encoder_arch", "mobileformer")
        return fields, encoder_config, encoder_arch

    @classmethod
    def from_config(cls, config: dict, *, encoder: nn.Module) -> "EncoderModel":
        return cls(encoder, cls.Config(**cls.split(config)[0]))


def frozen_fields(config, **values):
    """Set fields of a frozen dataclass in its ``__post_init__`` (JSON lists back to tuples, defaults resolved)."""
    for name, value in values.items():
        object.__setattr__(config, name, value)


# ---------------------------------------------------------------------------------------------------------------------
# The transformer block (ViT's)
# ---------------------------------------------------------------------------------------------------------------------

class TransformerBlock(nn.Module):
    """A pre-norm ViT block: x + MHSA(LN(x)), then x + MLP(LN(x)) with a 4x GELU MLP. No positional embedding
    anywhere, so it is equivariant to any permutation of the tokens."""

    def __init__(self, dim: int, *, heads: int, mlp_ratio: int = 4, dropout: float = 0.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"heads: {heads} must divide the width {dim}")
        self.heads, self.dropout = heads, dropout
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(mlp_ratio * dim, dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        x = x + self.proj(a.transpose(1, 2).reshape(B, N, D))
        return x + self.mlp(self.norm2(x))


def init_vit(module: nn.Module):
    """ViT / MAE initialisation: Linear weights trunc-normal(0.02) (xavier for MAE's decoder is close), zero bias."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
