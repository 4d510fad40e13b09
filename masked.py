"""Masked FINOLA (the paper's §3, Fig. 4; App. B Table 10; App. C Table 12; App. F Table 16).

A single unmasked block, half the image's width and height, floats around the image; the encoder sees only that
block, FINOLA grows a full-size feature map from it, and an upsampler predicts the whole image. The loss is the pixel
MSE on the masked region only (§3, "Simple block masking"). Two variants (Fig. 4):

- Masked-FINOLA-E (element-wise): the block's features are pooled into one vector q, which ``finola.expand`` grows
  into the full map; a linear layer turns each C-channel token into a p x p x 3 patch (§3, Table 10).
- Masked-FINOLA-B (block-wise): the block's feature map is not compressed; each of its four corner quadrants predicts
  its own partition of the map block-wise with Eq. 3; transformer blocks without positional embedding, then the linear
  patch layer, decode it (§3, Table 10, App. F).

Geometry. The image is a grid of (gh, gw) patches of p x p pixels. A block is given by its top-left cell (row, col);
it covers (gh/2, gw/2) cells. ``sample_blocks`` draws one block per image, uniformly among the
(gh/2 + 1)(gw/2 + 1) positions on the patch grid; evaluation uses the centred block.

The patch size and the choices the paper's terse text leaves open, numbered as the code cites them ("reading 2"):
PAPER_READING.md, Masked FINOLA. This file imports torch, finola.py and the standard library only, so it can be
copied with finola.py.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

import finola
import layers


# ---------------------------------------------------------------------------------------------------------------------
# The masking geometry (§3, "Simple block masking")
# ---------------------------------------------------------------------------------------------------------------------

def block_cells(grid) -> tuple[int, int]:
    """(rows, cols) of the unmasked block on a (gh, gw) patch grid: half of each side (a quadrant's size)."""
    gh, gw = grid
    if gh % 2 or gw % 2 or gh < 2 or gw < 2:
        raise ValueError(f"grid: expected even sides >= 2 so that a block is half of each, got {tuple(grid)}")
    return gh // 2, gw // 2


def sample_blocks(batch: int, grid, *, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """Top-left cells (B, 2) = (row, col) of one random block per image, uniform over the positions on the grid."""
    bh, bw = block_cells(grid)
    rows = torch.randint(0, grid[0] - bh + 1, (batch,), generator=generator, device=device)
    cols = torch.randint(0, grid[1] - bw + 1, (batch,), generator=generator, device=device)
    return torch.stack([rows, cols], 1)


def centred_blocks(batch: int, grid, *, device=None) -> torch.Tensor:
    """Top-left cells (B, 2) of the centred block (evaluation, ``maps``)."""
    bh, bw = block_cells(grid)
    return torch.tensor([(grid[0] - bh) // 2, (grid[1] - bw) // 2], device=device).expand(batch, 2)


def _check_blocks(blocks: torch.Tensor, grid, batch: int):
    bh, bw = block_cells(grid)
    if not torch.is_tensor(blocks) or blocks.shape != (batch, 2) or blocks.is_floating_point():
        shape = tuple(blocks.shape) if torch.is_tensor(blocks) else type(blocks).__name__
        raise ValueError(f"blocks: expected integer top-left cells of shape ({batch}, 2), got {shape}")
    if (blocks < 0).any() or (blocks[:, 0] > grid[0] - bh).any() or (blocks[:, 1] > grid[1] - bw).any():
        raise ValueError(f"blocks: every {bh}x{bw} block must lie inside the {grid[0]}x{grid[1]} grid, "
                         f"got top-left cells {blocks.tolist()}")


def crop_blocks(x: torch.Tensor, blocks: torch.Tensor, *, patch: int) -> torch.Tensor:
    """The unmasked block of every image: (B, 3, H/2, W/2) pixels of x (B, 3, H, W) at ``blocks`` (patch cells).

    Only these pixels reach the encoder."""
    B, _, H, W = x.shape
    grid = (H // patch, W // patch)
    _check_blocks(blocks, grid, B)
    bh, bw = block_cells(grid)
    rows = blocks[:, :1] * patch + torch.arange(bh * patch, device=x.device)  # (B, h)
    cols = blocks[:, 1:] * patch + torch.arange(bw * patch, device=x.device)  # (B, w)
    b = torch.arange(B, device=x.device)[:, None, None]
    return x[b, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)  # advanced indices first: (B, h, w, 3)


def loss_mask(blocks: torch.Tensor, grid, *, patch: int) -> torch.Tensor:
    """(B, 1, gh p, gw p) bool, True on the masked region: every pixel outside the block."""
    _check_blocks(blocks, grid, len(blocks))
    bh, bw = block_cells(grid)
    r = torch.arange(grid[0], device=blocks.device)
    c = torch.arange(grid[1], device=blocks.device)
    inside_r = (r >= blocks[:, :1]) & (r < blocks[:, :1] + bh)  # (B, gh)
    inside_c = (c >= blocks[:, 1:]) & (c < blocks[:, 1:] + bw)  # (B, gw)
    cells = ~(inside_r[:, :, None] & inside_c[:, None, :])
    return cells.repeat_interleave(patch, 1).repeat_interleave(patch, 2)[:, None]


def masked_mse(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The loss of §3: mean squared error over the masked pixels (mask (B, 1, H, W), True = masked) only."""
    m = mask.to(prediction.dtype)
    return ((prediction - target).square() * m).sum() / (m.sum() * prediction.shape[1]).clamp_min(1)


# ---------------------------------------------------------------------------------------------------------------------
# Masked-B's partitions and block offsets (PAPER_READING.md, Masked FINOLA, readings 3-5)
# ---------------------------------------------------------------------------------------------------------------------

def offset_map(blocks: torch.Tensor, grid) -> dict[str, torch.Tensor]:
    """Where every cell of the map comes from in Masked-B: a dict of (B, gh, gw) long tensors.

    "partition": k = 2 i + j for the sub-block (i, j) of the block (0 = top-left, 1 = top-right, 2 = bottom-left,
    3 = bottom-right) whose partition holds the cell; "row", "col": the source cell inside that sub-block (0-based);
    "v", "u": the block offsets of Eq. 3 (rows, columns), so map[cell] = shift(sub-block[row, col], u, v);
    "source_row", "source_col": the source's cell on the grid. The sub-block (i, j) starts at
    (r0 + i gh/4, c0 + j gw/4); its partition spans rows [0, r0 + gh/4) for i = 0 and [r0 + gh/4, gh) for i = 1
    (columns alike).
    """
    gh, gw = grid
    if gh % 4 or gw % 4:
        raise ValueError(f"grid: Masked-B splits the half-size block into quadrants: expected sides divisible by 4, "
                         f"got {tuple(grid)}")
    _check_blocks(blocks, grid, len(blocks))
    i, v, row, top = _axis(blocks[:, :1], gh, gh // 4)
    j, u, col, left = _axis(blocks[:, 1:], gw, gw // 4)
    rows = {"partition": 2 * i, "row": row, "v": v, "source_row": top + row}   # (B, gh) each
    cols = {"partition": j, "col": col, "u": u, "source_col": left + col}      # (B, gw) each
    out = {k: t[:, :, None].expand(-1, gh, gw) for k, t in rows.items()}
    for k, t in cols.items():
        out[k] = out[k] + t[:, None, :] if k in out else t[:, None, :].expand(-1, gh, gw)
    return out


def _axis(start: torch.Tensor, n: int, size: int):
    """Along one axis of n cells, for a block starting at ``start`` (B, 1) with sub-blocks of ``size`` cells:
    which half (0 / 1), the block offset, the position inside the sub-block, and that sub-block's first cell."""
    cell = torch.arange(n, device=start.device)
    half = (cell >= start + size).long()
    first = start + half * size
    return half, torch.div(cell - first, size, rounding_mode="floor"), torch.remainder(cell - first, size), first


TILES = 3  # block offsets per axis and partition: {-2, -1, 0} towards the map's top / left, {0, 1, 2} otherwise


def blockwise_map(params: dict, features: torch.Tensor, blocks: torch.Tensor, grid) -> torch.Tensor:
    """Masked-B's full map (B, C, gh, gw) from the block's features (B, C, gh/2, gw/2) at ``blocks``.

    Each sub-block (i, j) is expanded block-wise over a 3 x 3 grid of tiles with ``finola.expand`` (every position of
    the sub-block is one "q"; tile (v, u) is Eq. 3's shift by block offsets (u, v), A_neg / B_neg towards the top-left
    partition's side), then every cell gathers its value as ``offset_map`` says. One expand per partition, every image
    and position at once; images may have different blocks.
    """
    B, C, h2, w2 = features.shape
    gh, gw = grid
    if (h2 * 2, w2 * 2) != (gh, gw):
        raise ValueError(f"features: expected the block's (B, C, {gh // 2}, {gw // 2}) map for a {gh}x{gw} grid, "
                         f"got {tuple(features.shape)}")
    hs, ws = gh // 4, gw // 4
    where = offset_map(blocks, grid)
    subs = features.reshape(B, C, 2, hs, 2, ws)
    tiles = []
    for i in (0, 1):
        for j in (0, 1):
            q = subs[:, :, i, :, j, :].permute(0, 2, 3, 1).reshape(B * hs * ws, C)
            origin = ((TILES - 1) * (1 - i), (TILES - 1) * (1 - j))  # the sub-block's own tile
            z = finola.expand(params, q, size=(TILES, TILES), origin=origin)  # (B hs ws, C, 3, 3)
            tiles.append(z.reshape(B, hs, ws, C, TILES, TILES).permute(0, 1, 2, 4, 5, 3))
    table = torch.stack(tiles, 1).reshape(-1, C)  # rows indexed by (b, k, row, col, tile v, tile u)
    k = where["partition"]
    tv = where["v"] + (TILES - 1) * (1 - k // 2)
    tu = where["u"] + (TILES - 1) * (1 - k % 2)
    b = torch.arange(B, device=features.device)[:, None, None]
    index = ((((b * 4 + k) * hs + where["row"]) * ws + where["col"]) * TILES + tv) * TILES + tu
    return table[index].permute(0, 3, 1, 2)


# ---------------------------------------------------------------------------------------------------------------------
# Decoders (Table 10): transformer blocks without positional embedding before the linear patch layer
# (finola.LinearUpsampler)
# ---------------------------------------------------------------------------------------------------------------------

class TransformerUpsampler(nn.Module):
    """Table 10, Masked-FINOLA-B: project each token to ``width``, ``depth`` transformer blocks (6 x 512 in the paper;
    Table 16 varies the depth) with no positional embedding, LayerNorm, then the linear p x p x 3 patch layer."""

    def __init__(self, channels: int, *, patch: int, width: int = 512, depth: int = 6, heads: int = 8):
        super().__init__()
        self.patch = patch
        self.embed = nn.Linear(channels, width)
        self.blocks = nn.Sequential(*(layers.TransformerBlock(width, heads=heads) for _ in range(depth)))
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.linear = nn.Linear(width, 3 * patch * patch)
        layers.init_vit(self)

    def patches(self, z: torch.Tensor) -> torch.Tensor:
        """(B, H W, 3 p p): one patch per token, token order = row-major positions of z."""
        return self.linear(self.norm(self.blocks(self.embed(finola.tokens(z)))))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return finola.fold_patches(self.patches(z), z.shape[-2:], self.patch)


# ---------------------------------------------------------------------------------------------------------------------
# The two models
# ---------------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class MaskedEConfig:
    """Masked-FINOLA-E (§3, Table 10 middle column). Paper: 256^2 images, a 16 x 16 grid of 16 px patches."""
    channels: int = 3072                    # C of q and the map (vanilla FINOLA's default, Table 2a)
    grid: tuple = (16, 16)
    patch: int = 16                         # pixels per grid cell: the linear layer outputs p x p x 3
    heads: int = 8                          # of the attentional pooler (App. B)
    mean: tuple = layers.IMAGENET_MEAN  # input normalization of [0, 1] images for the encoder (PixelNorm)
    std: tuple = layers.IMAGENET_STD

    def __post_init__(self):
        layers.frozen_fields(self, grid=tuple(self.grid), mean=tuple(self.mean), std=tuple(self.std))
        block_cells(self.grid)


@dataclass(frozen=True, kw_only=True)
class MaskedBConfig:
    """Masked-FINOLA-B (§3, Table 10 right column, Table 16). Paper: 256^2, 16 x 16 grid, 6 blocks of width 512."""
    channels: int | None = None             # C of the map; None: the encoder's width, its features directly (reading 6)
    grid: tuple = (16, 16)
    patch: int = 16
    width: int = 512                        # transformer upsampler (Table 10)
    depth: int = 6                          # its blocks (Table 16 ablates the depth)
    heads: int = 8
    mean: tuple = layers.IMAGENET_MEAN
    std: tuple = layers.IMAGENET_STD

    def __post_init__(self):
        layers.frozen_fields(self, grid=tuple(self.grid), mean=tuple(self.mean), std=tuple(self.std))
        if self.grid[0] % 4 or self.grid[1] % 4:
            raise ValueError(f"grid: Masked-B needs sides divisible by 4 (quadrants of a half-size block), "
                             f"got {self.grid}")


class _Masked(layers.EncoderModel):
    """What both variants share: input normalization, the block crop, the loss mask and the calling convention.

    ``model(x, blocks=None)`` takes images in [0, 1] (B, 3, gh p, gw p) and returns (prediction (B, 3, H, W),
    mask (B, 1, H, W) True on the masked region). Without ``blocks`` a training-mode model draws one random block per
    image (global torch RNG) and an eval-mode model uses the centred block. ``maps(x)`` is the full FINOLA map
    (B, C, gh, gw) built from the centred block.
    """

    def _setup(self, encoder: nn.Module, config):
        self.config = config
        self.encoder = encoder
        self.finola = nn.ParameterDict({k: nn.Parameter(v) for k, v in finola.init(config.channels).items()})
        self.image_size = tuple(g * config.patch for g in config.grid)
        self.pixels = layers.PixelNorm(config.mean, config.std)

    def _check(self, x: torch.Tensor):
        self.pixels.check(x, self.image_size)

    def encode_block(self, x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
        """The encoder's output map (B, C_enc, gh/2, gw/2) of the unmasked blocks alone."""
        crop = crop_blocks(x, blocks, patch=self.config.patch)
        fmap, _ = self.encoder(self.pixels(crop))
        return fmap

    def _blocks(self, x: torch.Tensor, blocks):
        if blocks is not None:
            return blocks.to(x.device)
        make = sample_blocks if self.training else centred_blocks
        return make(len(x), self.config.grid, device=x.device)

    def maps(self, x: torch.Tensor) -> torch.Tensor:
        """The full FINOLA map (B, C, gh, gw) built from the centred block (what the analyses look at)."""
        self._check(x)
        return self.build_map(x, centred_blocks(len(x), self.config.grid, device=x.device))

    def forward(self, x: torch.Tensor, blocks: torch.Tensor | None = None):
        self._check(x)
        blocks = self._blocks(x, blocks)
        return self.upsampler(self.build_map(x, blocks)), loss_mask(blocks, self.config.grid, patch=self.config.patch)


class MaskedFinolaE(_Masked):
    """Masked-FINOLA-E: block -> encoder -> attentional pooling -> q at the block's centre cell -> ``expand`` over the
    whole grid -> linear patch layer (§3, Fig. 4 left)."""

    arch = "masked-e"  # its name in weights files (weights.architectures)

    Config = MaskedEConfig

    def __init__(self, encoder: nn.Module, config: MaskedEConfig):
        super().__init__()
        self._setup(encoder, config)
        self.pool = finola.AttentionPool(encoder.out_channels, config.channels, heads=config.heads)
        self.upsampler = finola.LinearUpsampler(config.channels, patch=config.patch)

    def build_map(self, x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
        """Expand q over a (2gh - 1) x (2gw - 1) canvas from its centre, then cut each image's (gh, gw) window so
        that q lands on its block's centre cell (reading 2): every image in one ``expand``, at the price of
        (2gh - 1)(2gw - 1) / (gh gw) ~ 3.8x the cells of the map itself (at 16 x 16)."""
        q = self.pool(self.encode_block(x, blocks))
        gh, gw = self.config.grid
        canvas = finola.expand(dict(self.finola), q, size=(2 * gh - 1, 2 * gw - 1), origin=(gh - 1, gw - 1))
        anchor = blocks + torch.tensor([gh // 4, gw // 4], device=blocks.device)  # the block's centre cell
        rows = (gh - 1 - anchor[:, :1]) + torch.arange(gh, device=x.device)  # (B, gh)
        cols = (gw - 1 - anchor[:, 1:]) + torch.arange(gw, device=x.device)
        b = torch.arange(len(q), device=x.device)[:, None, None]
        return canvas[b, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


class MaskedFinolaB(_Masked):
    """Masked-FINOLA-B: block -> encoder -> its feature map (not compressed) -> block-wise Eq. 3 per partition
    (``blockwise_map``) -> transformer upsampler without positional embedding (§3, Fig. 4 right)."""

    arch = "masked-b"  # its name in weights files (weights.architectures)

    Config = MaskedBConfig

    def __init__(self, encoder: nn.Module, config: MaskedBConfig):
        super().__init__()
        if config.channels is None:
            config = dataclasses.replace(config, channels=encoder.out_channels)
        self._setup(encoder, config)
        self.project = (nn.Identity() if config.channels == encoder.out_channels
                        else nn.Conv2d(encoder.out_channels, config.channels, 1))
        self.upsampler = TransformerUpsampler(config.channels, patch=config.patch, width=config.width,
                                              depth=config.depth, heads=config.heads)

    def build_map(self, x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
        features = self.project(self.encode_block(x, blocks))
        return blockwise_map(dict(self.finola), features, blocks, self.config.grid)
