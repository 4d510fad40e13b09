"""MAE (He et al., "Masked Autoencoders Are Scalable Vision Learners", 2022): the masked-image-modelling baseline
that the paper's Table 6 sets FINOLA against (its MAE-Lite ViT-Tiny: 23.3 % linear probe), on a ViT encoder.

The encoder (``ViT``): a p x p patch embedding (a conv of stride p), MAE's fixed 2-D sin-cos positions, a cls token,
pre-norm transformer blocks (layers.TransformerBlock) and a final LayerNorm. ``vit(x)`` returns (the patch tokens as
a map (B, C, H/p, W/p), the cls token (B, 1, C)), Mobile-Former's calling convention, so ``classify.Classifier``
probes it unchanged (what its probes read: PAPER_READING.md, MAE).

The pre-training model (``MAE``), per image: a random ``mask_ratio`` of the N patches is removed, exactly
round(N * ratio) of them (the argsort of uniform noise, as MAE draws them); the encoder sees the rest and the cls
token; a light decoder (a linear map to its width, a learned mask token for each removed patch, sin-cos positions,
transformer blocks, LayerNorm, a linear map to p x p x 3) predicts every patch; the loss (``loss``) is the MSE over
the removed patches only, against each patch normalized by its own mean and variance (MAE's ``norm_pix_loss``).

Sizes (``vit-tiny``: MAE-Lite's ViT-Tiny and decoder; the patch side): there too. Initialisation
follows MAE: xavier-uniform linear layers and patch embedding, N(0, 0.02) cls and mask tokens, LayerNorm (1, 0).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

import finola
import layers


def sincos_positions(h: int, w: int, dim: int, *, device=None) -> torch.Tensor:
    """MAE's fixed 2-D positions, (h w, dim) in row-major order: dim/2 channels encode the row, dim/2 the column,
    each as sin | cos of position x 10000^(-k / (dim/4)), k < dim/4."""
    if dim % 4:
        raise ValueError(f"dim: sin-cos positions need a width divisible by 4, got {dim}")
    n = dim // 4
    omega = 10000.0 ** (-torch.arange(n, device=device, dtype=torch.float32) / n)
    rows, cols = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    angles = [p.flatten().float()[:, None] * omega for p in (rows, cols)]
    return torch.cat([f(a) for a in angles for f in (torch.sin, torch.cos)], dim=1)


def patchify(x: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, 3, gh p, gw p) -> (B, gh gw, 3 p p): the inverse of ``finola.fold_patches`` (row-major patches)."""
    B, C, H, W = x.shape
    return x.reshape(B, C, H // patch, patch, W // patch, patch).permute(0, 2, 4, 1, 3, 5).reshape(
        B, (H // patch) * (W // patch), C * patch * patch)


def _init(module: nn.Module):
    """MAE's initialisation: xavier-uniform linear layers (the patch embedding as one), zero biases."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.xavier_uniform_(m.weight.view(m.weight.shape[0], -1))
            nn.init.zeros_(m.bias)


# ---------------------------------------------------------------------------------------------------------------------
# The encoder
# ---------------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class ViTConfig:
    """A ViT encoder (no classifier). ``patch`` is set per run (image size / --grid)."""
    name: str = "custom"
    patch: int = 16
    width: int = 192
    depth: int = 12
    heads: int = 12
    mlp_ratio: int = 4
    in_channels: int = 3

    def __post_init__(self):
        if self.width % self.heads or self.width % 4:
            raise ValueError(f"width: {self.width} must divide by heads={self.heads} and by 4 (sin-cos positions)")


PRESETS = {"vit-tiny": ViTConfig(name="vit-tiny")}  # MAE-Lite's ViT-Tiny


class ViT(nn.Module):
    """``vit(x)`` -> (patch tokens as a map (B, C, H/p, W/p), cls token (B, 1, C)) for images normalized as the
    encoder expects (the owning model's PixelNorm); H and W multiples of the patch side."""

    arch = "vit"  # its name in weights files (weights.architectures)

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.config = config
        c = config.width
        self.patch_embed = nn.Conv2d(config.in_channels, c, config.patch, stride=config.patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, c))
        self.blocks = nn.Sequential(*(layers.TransformerBlock(c, heads=config.heads, mlp_ratio=config.mlp_ratio)
                                      for _ in range(config.depth)))
        self.norm = nn.LayerNorm(c, eps=1e-6)
        _init(self)
        nn.init.normal_(self.cls, std=0.02)

    @property
    def out_channels(self) -> int:
        return self.config.width

    frozen = False

    def freeze(self, frozen: bool = True) -> "ViT":
        """Probing: no gradients (as ``MobileFormer.freeze``; a ViT has no BatchNorm statistics to keep)."""
        self.frozen = frozen
        self.requires_grad_(not frozen)
        return self.train(self.training)

    def train(self, mode: bool = True):
        return super().train(mode and not self.frozen)

    def config_dict(self) -> dict:
        return dataclasses.asdict(self.config)

    @classmethod
    def from_config(cls, config: dict) -> "ViT":
        return cls(ViTConfig(**config))

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """(patch tokens with their positions (B, N, C), the patch grid (h, w))."""
        p = self.config.patch
        if x.dim() != 4 or x.shape[1] != self.config.in_channels or x.shape[2] % p or x.shape[3] % p:
            raise ValueError(f"x: expected images (B, {self.config.in_channels}, H, W) with H and W multiples of the "
                             f"patch side {p}, got {tuple(x.shape)}")
        grid = (x.shape[2] // p, x.shape[3] // p)
        tokens = finola.tokens(self.patch_embed(x))
        return tokens + sincos_positions(*grid, self.out_channels, device=x.device).to(tokens.dtype), grid

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        """The cls token and ``tokens`` (B, n, C) through the blocks: (B, 1 + n, C)."""
        cls = self.cls.expand(len(tokens), -1, -1)
        return self.norm(self.blocks(torch.cat([cls, tokens], dim=1)))

    def forward(self, x: torch.Tensor):
        tokens, (h, w) = self.embed(x)
        y = self.encode(tokens)
        return y[:, 1:].transpose(1, 2).reshape(len(x), -1, h, w), y[:, :1]


def create(name: str, **overrides) -> ViT:
    """A fresh ViT from ``PRESETS`` with config fields replaced, e.g. ``create("vit-tiny", patch=8)``."""
    if name not in PRESETS:
        raise ValueError(f"name: unknown ViT {name!r}; expected one of {sorted(PRESETS)}")
    return ViT(dataclasses.replace(PRESETS[name], **overrides))


# ---------------------------------------------------------------------------------------------------------------------
# MAE pre-training
# ---------------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class MAEConfig:
    """MAE's pre-training head (He et al. §3); the decoder defaults are MAE-Lite's for ViT-Tiny (MAE's ViT-B:
    8 blocks x 512)."""
    mask_ratio: float = 0.75
    decoder_width: int = 96
    decoder_depth: int = 1
    decoder_heads: int = 3
    norm_pixels: bool = True                # the target: each patch normalized by its mean and variance
    mean: tuple = layers.IMAGENET_MEAN  # input normalization of [0, 1] images for the encoder (PixelNorm)
    std: tuple = layers.IMAGENET_STD

    def __post_init__(self):
        if not 0 < self.mask_ratio < 1:
            raise ValueError(f"mask_ratio: expected a fraction in (0, 1), got {self.mask_ratio}")
        if self.decoder_width % self.decoder_heads or self.decoder_width % 4:
            raise ValueError(f"decoder_width: {self.decoder_width} must divide by decoder_heads="
                             f"{self.decoder_heads} and by 4")
        layers.frozen_fields(self, mean=tuple(self.mean), std=tuple(self.std))


class MAE(layers.EncoderModel):
    """``model(x, generator=None)`` on images in [0, 1] -> (prediction, target, mask): every patch predicted (B, N,
    3 p p), the patches as the loss sees them (normalized per patch with ``norm_pixels``), and True where a patch
    was removed (B, N). The removed patches are drawn from ``generator`` (the global RNG without one)."""

    arch = "mae"  # its name in weights files (weights.architectures)

    Config = MAEConfig

    def __init__(self, encoder: ViT, config: MAEConfig):
        super().__init__()
        self.config = config
        self.encoder = encoder
        self.pixels = layers.PixelNorm(config.mean, config.std)
        d, p = config.decoder_width, encoder.config.patch
        self.decoder_embed = nn.Linear(encoder.out_channels, d)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, d))
        self.decoder = nn.Sequential(*(layers.TransformerBlock(d, heads=config.decoder_heads)
                                       for _ in range(config.decoder_depth)))
        self.decoder_norm = nn.LayerNorm(d, eps=1e-6)
        self.predict = nn.Linear(d, 3 * p * p)
        _init(nn.ModuleList([self.decoder_embed, self.decoder, self.predict]))
        nn.init.normal_(self.mask_token, std=0.02)

    def kept(self, batch: int, patches: int, *, generator=None, device=None) -> torch.Tensor:
        """(B, n) indices of the patches each image keeps, n = patches - round(patches * mask_ratio)."""
        n = patches - round(patches * self.config.mask_ratio)
        noise = torch.rand(batch, patches, generator=generator, device=None if generator is None else generator.device)
        return noise.to(device).argsort(dim=1)[:, :n]

    def forward(self, x: torch.Tensor, *, generator: torch.Generator | None = None):
        tokens, (h, w) = self.encoder.embed(self.pixels(x))
        B, N, C = tokens.shape
        keep = self.kept(B, N, generator=generator, device=x.device)
        latent = self.encoder.encode(tokens.gather(1, keep[..., None].expand(-1, -1, C)))
        y = self.decoder_embed(latent)
        d = y.shape[-1]
        full = self.mask_token.expand(B, N, d).scatter(1, keep[..., None].expand(-1, -1, d), y[:, 1:])
        full = full + sincos_positions(h, w, d, device=x.device).to(full.dtype)
        z = self.decoder_norm(self.decoder(torch.cat([y[:, :1], full], dim=1)))[:, 1:]
        mask = torch.ones(B, N, dtype=torch.bool, device=x.device).scatter(1, keep, False)
        return self.predict(z), self.target(x), mask

    def target(self, x: torch.Tensor) -> torch.Tensor:
        """The patches of x (B, N, 3 p p), each normalized by its own mean and (unbiased) variance with
        ``norm_pixels``."""
        t = patchify(x, self.encoder.config.patch)
        if self.config.norm_pixels:
            t = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6).sqrt()
        return t


def loss(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """MAE's loss: the mean over the removed patches (``mask`` True) of each patch's mean squared error."""
    per_patch = (prediction - target).square().mean(-1)
    return (per_patch * mask).sum() / mask.sum()


@torch.no_grad()
def evaluate(model: MAE, loader, *, show: int = 8, seed: int = 0) -> tuple[dict, list[torch.Tensor]]:
    """MAE's loss over the removed patches (``mae_loss``; the same patches every time, drawn from ``seed``) next to
    predicting each removed patch as its own mean colour (``patch_mean_loss``: 0 in the normalized target, so ~1
    with ``norm_pixels``), and three rows of ``show`` images for a figure: originals, the visible patches (removed
    ones grey), the prediction pasted into the removed ones (mapped back with each true patch's mean and variance
    when normalized, as MAE's own figures are drawn)."""
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    sums, removed, images, shown = {"mae_loss": 0.0, "patch_mean_loss": 0.0}, 0, 0, []
    p = model.encoder.config.patch
    for batch in loader:
        x = batch["images"]
        prediction, target, mask = model(x, generator=generator)
        for key, guess in (("mae_loss", prediction), ("patch_mean_loss", torch.zeros_like(target))):
            sums[key] += ((guess - target).square().mean(-1) * mask).sum().item()
        removed, images = removed + int(mask.sum()), images + len(x)
        if len(shown) < show:
            raw, cells = patchify(x, p), (x.shape[2] // p, x.shape[3] // p)
            if model.config.norm_pixels:
                prediction = prediction * (raw.var(-1, keepdim=True) + 1e-6).sqrt() + raw.mean(-1, keepdim=True)
            m = mask[..., None]
            rows = (x, finola.fold_patches(torch.where(m, 0.5, raw), cells, p),
                    finola.fold_patches(torch.where(m, prediction.clamp(0, 1), raw), cells, p))
            shown += list(zip(*rows))[: show - len(shown)]
    if not images:
        raise ValueError("mae: the data gave no images")
    result = {k: round(v / removed, 4) for k, v in sums.items()} | {"images": images}
    return result, [torch.stack([row[i] for row in shown]) for i in range(3)]
