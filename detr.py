"""DETR with a Mobile-Former decoder (FINOLA App. B, Table 11; Tables 4, 8, 18; App. C).

FINOLA evaluates its encoders on COCO inside DETR (Carion et al., 2020) whose transformer encoder and decoder are
replaced by a Mobile-Former decoder (Mobile-Former, Chen et al., CVPR 2022, §"end-to-end detector"): the 100 object
queries are the decoder's global tokens, and the feature-map stream runs over three scales, with M-F⁺ / M-F⁻ blocks
(Table 11 caption): `mf-dec-522` / `mf-dec-211` (Tables 4/18) and our CPU-scale `mf-dec-tiny`. Table 11's body is
missing from our copy of the paper: the layout we fitted and the other choices it leaves open are in
PAPER_READING.md, DETR. This file holds the decoder and the detector; `detection.py` holds what it is trained and
scored with (boxes, matcher, set criterion, post-processing). It imports torch and our `mobileformer` (whose
bridges, Former and lite bottleneck it reuses).

Padded batches (DETR's images of different sizes): `DETR`. Training remedies (ours, off in the paper's recipe, on
in the small one; EXPERIMENTS.md measures each): `reference_boxes` (SMCA, DAB-DETR, Deformable DETR),
`class_loss="focal"` (Deformable DETR) and `denoising` (DN-DETR's noised true boxes as extra training queries that no
object query can see; none at inference).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import detection
import layers
import mobileformer
from mobileformer import (Former, FormerToMobile, LiteBottleneck, MobileToFormer, conv_bn, halve, key_mask,
                          zero_padding)


# ---------------------------------------------------------------------------------------------------------------
# The Mobile-Former decoder (Table 11)
# ---------------------------------------------------------------------------------------------------------------
# Where the sine channels go. Every attention over the map here splits its channels into heads by contiguous runs
# (Mobile→Former and the pixel transformer read the map as keys, Former→Mobile as queries, with no projection), so
# DETR's layout [y-sin, y-cos, x-sin, x-cos] gives each bridge head one axis: a query could pick a row band in one
# head and a column band in the other, never a point. The "heads" layout repeats one whole encoding (both axes, sin
# and cos) in each head's run of channels, made of the informative end of DETR's frequencies: the first
# dim / (4 · groups) of its dim / 4, so that each head keeps the spatial resolution DETR's encoding has. "axes" is
# DETR's layout, which files written before the fix were trained with.
POSITION_LAYOUTS = ("heads", "axes")


@dataclass(frozen=True, kw_only=True)
class DecoderConfig:
    """A Mobile-Former DETR decoder. `depths`: blocks at 1/32 (M-F⁺), 1/16 and 1/8 (M-F⁻)."""
    name: str = "custom"
    depths: tuple[int, int, int]
    dim: int = 256                   # query dimension = map channels (Table 11 caption)
    num_queries: int = 100
    expansion: int = 6               # FFN ratio of both transformers; lite bottleneck's depthwise multiplier
    heads: int = 8                   # of the query Former and the pixel transformer (DETR's 8)
    bridge_heads: int = 2            # of Mobile→Former and Former→Mobile (Mobile-Former's)
    dropout: float = 0.1             # App. C
    position_layout: str = "heads"   # sine channels per attention head ("axes": files before it, see below)
    reference_boxes: bool = False    # ours (off in the paper's recipe): a box per query that steers attention

    def __post_init__(self):
        object.__setattr__(self, "depths", tuple(int(d) for d in self.depths))
        if len(self.depths) != 3 or min(self.depths) < 1:
            raise ValueError(f"depths: need three positive block counts (1/32, 1/16, 1/8), got {self.depths}")
        if self.position_layout not in POSITION_LAYOUTS:
            raise ValueError(f"position_layout: expected one of {POSITION_LAYOUTS}, got {self.position_layout!r}")
        if self.dim % (4 * self.position_groups) or self.dim % self.heads or self.dim % self.bridge_heads:
            raise ValueError(f"dim: {self.dim} must divide by heads={self.heads}, bridge_heads={self.bridge_heads} "
                             f"and 4 x {self.position_groups} (sine encoding: 4 channels a frequency in each of "
                             f"{self.position_groups} head groups)")
        if self.num_queries < 1:
            raise ValueError(f"num_queries: must be positive, got {self.num_queries}")

    @property
    def position_groups(self) -> int:
        """Runs of channels that each hold a whole sine encoding: one per head of every attention over the map
        (the least common multiple of ``heads`` and ``bridge_heads``) for the "heads" layout, 1 for "axes"."""
        return math.lcm(self.heads, self.bridge_heads) if self.position_layout == "heads" else 1


PRESETS: dict[str, DecoderConfig] = {
    "mf-dec-522": DecoderConfig(name="mf-dec-522", depths=(5, 2, 2)),
    "mf-dec-211": DecoderConfig(name="mf-dec-211", depths=(2, 1, 1)),
    # Ours: CPU-scale, same structure.
    "mf-dec-tiny": DecoderConfig(name="mf-dec-tiny", depths=(1, 1, 1), dim=64, heads=4, expansion=2),
}


def pixel_centres(h: int, w: int, keep: torch.Tensor | None = None, *,
                  device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, x), each (1 or B, h, w): the pixel centres' positions (i + 0.5) / (the image's own extent) in (0, 1),
    counted as DETR does by a cumulative sum of ``keep`` (B, 1, h, w; 1 on each image, 0 on its padding)."""
    keep = torch.ones(1, 1, h, w, device=device) if keep is None else keep
    keep = keep[:, 0].float()
    y, x = keep.cumsum(1), keep.cumsum(2)
    return (y - 0.5) / y[:, -1:].clamp(min=1), (x - 0.5) / x[:, :, -1:].clamp(min=1)   # finite on padding too


def sine_position_encoding(h: int, w: int, dim: int, *, keep: torch.Tensor | None = None, groups: int = 1,
                           device=None, dtype=None, temperature: float = 10000.0) -> torch.Tensor:
    """DETR's normalized 2-D sine encoding, (1, dim, h, w), or (B, dim, h, w) with ``keep`` (B, 1, h, w), of
    ``pixel_centres`` · 2π. ``groups`` = 1: DETR's layout, dim/2 channels for y, dim/2 for x (sin, cos halves), at
    frequencies temperature^(−i / (dim/4)). ``groups`` = G: G equal runs of channels, each the layout of a dim/G
    encoding made of the first dim/(4G) of those frequencies (the "heads" layout above)."""
    if dim % (4 * groups):
        raise ValueError(f"dim: {dim} must divide by 4 x groups = {4 * groups}")
    y, x = (c * (2 * math.pi) for c in pixel_centres(h, w, keep, device=device))
    n = dim // 4
    freq = temperature ** (torch.arange(n // groups, device=y.device, dtype=torch.float32) / n)
    ey, ex = y[..., None] / freq, x[..., None] / freq                      # (B, h, w, n / groups)
    pe = torch.cat([ey.sin(), ey.cos(), ex.sin(), ex.cos()], dim=-1)       # (B, h, w, dim / groups)
    return pe.repeat(1, 1, 1, groups).permute(0, 3, 1, 2).to(dtype)


# Reference boxes (``reference_boxes``; ours, off in the paper's recipe). DETR's queries learn where to look from
# scratch, one reason it needs 500 epochs. Conditional / DAB-DETR give each query a box and SMCA a Gaussian prior
# around it; Deformable DETR refines the box block by block. Here: each query starts from a learned anchor box; in
# every block its attention over the pixels gets the log-prior −½((x − cx)² / (w/2)² + (y − cy)² / (h/2)²) (SMCA, with
# the box's own half-sides as the spread) in both bridges, its queries get an embedding of the box (DAB-DETR), and
# the box head predicts an offset from the box in logit space, whose result is the next block's box (detached).
def inverse_sigmoid(p: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    p = p.clamp(0, 1)
    return torch.log(p.clamp(min=eps) / (1 - p).clamp(min=eps))


def box_prior(refs: torch.Tensor, y: torch.Tensor, x: torch.Tensor, *, min_side: float = 1e-2) -> torch.Tensor:
    """SMCA's Gaussian log-prior of queries' cxcywh boxes ``refs`` (B, Q, 4) on pixels at ``pixel_centres`` ``y``, ``x``
    (B or 1, h, w): (B, 1, Q, h·w), 0 at a box's centre and −½ on its edges along each axis."""
    cx, cy, w, h = (t[..., None] for t in refs.unbind(-1))                  # (B, Q, 1)
    dx = (x.flatten(1)[:, None] - cx) / (w / 2).clamp(min=min_side)
    dy = (y.flatten(1)[:, None] - cy) / (h / 2).clamp(min=min_side)
    return (-0.5 * (dx.square() + dy.square()))[:, None]


def box_sine(refs: torch.Tensor, dim: int, *, temperature: float = 10000.0) -> torch.Tensor:
    """(B, Q, dim): each of the 4 box coordinates · 2π as dim/8 sines and dim/8 cosines (DAB-DETR's embedding)."""
    n = dim // 8
    freq = temperature ** (torch.arange(n, device=refs.device, dtype=torch.float32) / n)
    e = refs[..., None] * (2 * math.pi) / freq                              # (B, Q, 4, n)
    return torch.cat([e.sin(), e.cos()], dim=-1).flatten(-2).to(refs.dtype)


class PixelTransformer(nn.Module):
    """M-F⁺'s stand-in for the Mobile sub-block: a transformer block over the pixels, built as Mobile-Former's
    Former (keys = values = the pixels, post-norms, FFN ×expansion)."""

    def __init__(self, dim: int, *, heads: int, ffn_ratio: int):
        super().__init__()
        self.former = Former(dim, heads=heads, ffn_ratio=ffn_ratio)

    def forward(self, x: torch.Tensor, z: torch.Tensor,
                keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        b, c, h, w = x.shape
        y = self.former(x.flatten(2).transpose(1, 2), key_mask(keep))
        return y.transpose(1, 2).reshape(b, c, h, w), z


class DecoderBlock(nn.Module):
    """M-F⁺ / M-F⁻: Mobile→Former, Former over the queries, `mobile` (pixel transformer or lite bottleneck),
    Former→Mobile — the M-F order (mobileformer A1) with the Mobile sub-block swapped."""

    def __init__(self, mobile: nn.Module, config: DecoderConfig):
        super().__init__()
        d = config.dim
        self.mobile_to_former = MobileToFormer(d, d, heads=config.bridge_heads)
        self.former = Former(d, heads=config.heads, ffn_ratio=config.expansion)
        self.mobile = mobile
        self.former_to_mobile = FormerToMobile(d, d, heads=config.bridge_heads)

    def forward(self, x: torch.Tensor, z: torch.Tensor, keep: torch.Tensor | None = None, *,
                prior: torch.Tensor | None = None, query_pos: torch.Tensor | None = None,
                seen: torch.Tensor | None = None,
                writers: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``prior`` (B, 1, T, H·W): the tokens' reference-box log-prior (``box_prior``), in both bridges;
        ``query_pos``: their box embedding, added where they query the pixels. ``seen`` (B, 1, T, T), True where
        token i may attend to token j in the Former, and ``writers`` (T,), the tokens Former→Mobile may write into
        the map: denoising tokens ride along without changing what the object queries compute."""
        z = self.former(self.mobile_to_former(x, z, keep, bias=prior, query_pos=query_pos), seen)
        x, _ = self.mobile(x, z, keep)
        bias = None if prior is None else prior.transpose(2, 3)
        if writers is not None:
            bias = writers if bias is None else bias.masked_fill(~writers, float("-inf"))
        return zero_padding(self.former_to_mobile(x, z, bias=bias), keep), z


class BilinearUpConv(nn.Module):
    """up-conv (Table 11 caption): bilinear ×2 cropped to the finer map's `size`, then dw3×3 + pw (BN after each).
    With `keep` (the coarse map's padding mask) the interpolation is normalized by the interpolated mask, so padding
    gets no weight; `fine` is the finer map's mask."""

    def __init__(self, dim: int):
        super().__init__()
        self.dw, self.pw = conv_bn(dim, dim, 3, groups=dim), conv_bn(dim, dim, 1)

    def forward(self, x: torch.Tensor, size: tuple[int, int], keep: torch.Tensor | None = None,
                fine: torch.Tensor | None = None) -> torch.Tensor:
        up = lambda t: F.interpolate(t, scale_factor=2, mode="bilinear", align_corners=False)  # noqa: E731
        x = up(x) if keep is None else up(x * keep) / up(keep).clamp(min=1e-6)
        return self.pw(self.dw(zero_padding(x[..., :size[0], :size[1]], fine)))


class MobileFormerDecoder(nn.Module):
    """The three-scale decoder (PAPER_READING.md, DETR): from the backbone's final 1/16 map (`channels` wide) and its
    1/8 map (`stride8_channels`) to the queries after every block, stacked (L, B, Q, D)."""

    def __init__(self, config: DecoderConfig, *, channels: int, stride8_channels: int):
        super().__init__()
        self.config = config
        d, e = config.dim, config.expansion
        self.queries = nn.Parameter(torch.empty(config.num_queries, d))
        self.down = nn.Sequential(conv_bn(channels, channels, 3, stride=2, groups=channels), conv_bn(channels, d, 1))
        self.ups = nn.ModuleList([BilinearUpConv(d), BilinearUpConv(d)])                       # → 1/16, → 1/8
        self.laterals = nn.ModuleList([conv_bn(channels, d, 1), conv_bn(stride8_channels, d, 1)])
        plus = lambda: PixelTransformer(d, heads=config.heads, ffn_ratio=e)  # noqa: E731
        minus = lambda: LiteBottleneck(d, e * d, d)  # noqa: E731
        self.stages = nn.ModuleList(
            nn.ModuleList(DecoderBlock(make(), config) for _ in range(n))
            for make, n in zip((plus, minus, minus), config.depths))
        self.dropout = nn.Dropout(config.dropout)
        if config.reference_boxes:
            self.anchors = nn.Parameter(torch.empty(config.num_queries, 4))   # logits of each query's first box
            self.box_embed = MLP(d, d, d)                                      # DAB-DETR's query embedding of a box

    def reset_anchors(self):
        """The first boxes: centres uniform over the image, sides 0.2 (logit space)."""
        with torch.no_grad():
            self.anchors[:, :2] = inverse_sigmoid(torch.rand(self.config.num_queries, 2))
            self.anchors[:, 2:] = inverse_sigmoid(torch.tensor(0.2))

    def forward(self, features: torch.Tensor, stride8: torch.Tensor, keep: torch.Tensor | None = None, *,
                box_head: nn.Module | None = None,
                denoise: dict | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(tokens after every block (L, B, T, D), their boxes (L, B, T, 4) with reference boxes, else None).
        `keep`: the input images' padding mask (B, 1, H, W), 1 on each image; None: no padding. `box_head`: the
        detector's box MLP, which reference boxes need inside the loop. `denoise` (training, DN-DETR): {"content"
        (B, E, D), "boxes" (B, E, 4), "group" (E,), "valid" (B, E)}: E more tokens after the Q object queries, each
        seeing the queries and its own group, none writing into the map (``DecoderBlock``)."""
        keeps = [halve(keep, k) for k in (5, 4, 3)]                            # at 1/32, 1/16, 1/8
        b = features.shape[0]
        x, z = zero_padding(self.down(features), keeps[0]), self.queries.expand(b, -1, -1)
        refs = self.anchors.sigmoid().expand(b, -1, -1) if self.config.reference_boxes else None
        if refs is not None and box_head is None:
            raise ValueError("box_head: reference boxes need the detector's box head")
        seen = writers = None
        if denoise is not None:
            if refs is None:
                raise ValueError("denoise: denoising queries are noised boxes, so they need reference_boxes")
            z, refs = torch.cat([z, denoise["content"]], 1), torch.cat([refs, denoise["boxes"]], 1)
            seen, writers = denoising_masks(self.config.num_queries, denoise["group"], denoise["valid"])
        skips, states, predicted = (features, stride8), [], []
        for scale, blocks in enumerate(self.stages):
            if scale:
                skip = skips[scale - 1]
                x = (self.ups[scale - 1](x, skip.shape[2:], keeps[scale - 1], keeps[scale])
                     + self.laterals[scale - 1](skip))
            pe = sine_position_encoding(*x.shape[2:], self.config.dim, keep=keeps[scale],
                                        groups=self.config.position_groups, device=x.device, dtype=x.dtype)
            x = zero_padding(x + pe, keeps[scale])
            centres = pixel_centres(*x.shape[2:], keeps[scale], device=x.device) if refs is not None else None
            for block in blocks:
                z = self.dropout(z) if states else z                           # dropout between blocks (App. C)
                if refs is None:
                    x, z = block(x, z, keeps[scale])
                else:
                    x, z = block(x, z, keeps[scale], prior=box_prior(refs, *centres).to(x.dtype),
                                 query_pos=self.box_embed(box_sine(refs, self.config.dim)), seen=seen,
                                 writers=writers)
                    predicted.append((box_head(z) + inverse_sigmoid(refs)).sigmoid())
                    refs = predicted[-1].detach()                              # Deformable DETR's refinement
                states.append(z)
        return torch.stack(states), torch.stack(predicted) if predicted else None


def denoising_masks(queries: int, group: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DN-DETR's attention masks for ``queries`` object queries followed by denoising tokens of ``group`` (E,) that
    are ``valid`` (B, E): (seen (B, 1, T, T): object queries see object queries only, a denoising token sees them
    and the valid tokens of its own group; writers (T,): the object queries)."""
    b, device = valid.shape[0], valid.device
    groups = torch.cat([torch.full((queries,), -1, device=device), group.to(device)])          # (T,)
    alive = torch.cat([torch.ones(b, queries, dtype=torch.bool, device=device), valid], 1)    # (B, T)
    same = (groups[None, :] == -1) | (groups[None, :] == groups[:, None])                      # (T, T)
    return (same[None] & alive[:, None])[:, None], groups == -1


class MLP(nn.Sequential):
    """DETR's box head: Linear + ReLU between layers, none after the last."""

    def __init__(self, *dims: int):
        layers = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            layers += [nn.Linear(a, b)] + ([nn.ReLU()] if i < len(dims) - 2 else [])
        super().__init__(*layers)


# ---------------------------------------------------------------------------------------------------------------
# The detector
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class DETRConfig:
    """A detector on an encoder: its decoder, classes and whether the encoder is frozen (App. C, decoder probing)."""
    decoder: DecoderConfig
    num_classes: int                  # real classes; with class_loss "ce" the classifier adds one for no-object
    frozen: bool = False              # decoder probing: no gradient into the encoder, its BatchNorm in eval mode
    normalize_input: bool = True      # False: files written before the fix, whose encoders saw raw pixels
    class_loss: str = "ce"            # "ce": DETR's softmax with no-object; "focal": sigmoid focal (ours, see below)
    denoising: int = 0                # training groups of DN-DETR's noised true boxes (0: none, the paper's)

    def __post_init__(self):
        if isinstance(self.decoder, dict):  # from a weights file's JSON
            object.__setattr__(self, "decoder", DecoderConfig(**self.decoder))
        if self.num_classes < 1:
            raise ValueError(f"num_classes: must be positive, got {self.num_classes}")
        if self.class_loss not in detection.CLASS_LOSSES:
            raise ValueError(f"class_loss: expected one of {detection.CLASS_LOSSES}, got {self.class_loss!r}")
        if self.denoising < 0 or (self.denoising and not self.decoder.reference_boxes):
            raise ValueError(f"denoising: {self.denoising} groups; expected 0, or a positive count with the "
                             "decoder's reference_boxes (denoising queries are noised boxes)")


class DETR(layers.EncoderModel):
    """Encoder (a Mobile-Former, DETR's "backbone") + Mobile-Former decoder + DETR heads. `model(images, mask=None,
    targets=None)` → {"pred_logits": (B, Q, K+1) (K with class_loss "focal"), "pred_boxes": (B, Q, 4) cxcywh in
    [0, 1], "aux_outputs": [{...}] × (L − 1)}; in training with `denoising` and `targets`, also "dn_outputs" (one
    {...} per layer) and "dn_targets" (``detection.noised_targets``). `images` are in [0, 1]. The encoder sees images
    normalized as every encoder here is trained (`PixelNorm`), unless `normalize_input=False`. Its tensors keep DETR's
    name, `backbone.*`; `model.encoder` is the same module.

    Padded batches (`augment.DetrResize`): `mask` (B, H, W) is DETR's padding mask, True on padding. Boxes are
    normalized by each image's unpadded size, the sine positions by its unpadded extent, attention never reads padded
    pixels, every map is zero on its padding before a 3×3 conv (`mobileformer.zero_padding`), and the up-conv's bilinear ×2
    is normalized by the upsampled mask (`BilinearUpConv`). So an image's predictions do not depend on the padding
    around it, up to float rounding (with BatchNorm in eval mode, as DETR's own frozen BatchNorm:
    `tests/test_detr.py`). DETR itself pads its backbone's input and lets the padding reach its convs; ours does
    not."""

    arch = "detr"  # its name in weights files (weights.architectures)

    Config = DETRConfig
    RENAMED = {"backbone": "encoder", "frozen_backbone": "frozen"}  # files before the model contract

    def __init__(self, encoder: nn.Module, config: DETRConfig):
        super().__init__()
        if not (hasattr(encoder, "forward_features") and hasattr(encoder, "map_channels")):
            raise ValueError("encoder: need a multi-scale encoder with forward_features() and map_channels "
                             f"(a mobileformer.MobileFormer), got {type(encoder).__name__}")
        self.config = config
        self.pixels = layers.PixelNorm()
        self.backbone = encoder
        ch, dim = encoder.map_channels, config.decoder.dim
        self.decoder = MobileFormerDecoder(config.decoder, channels=ch["features"], stride8_channels=ch["stride8"])
        focal = config.class_loss == "focal"
        self.class_head = nn.Linear(dim, config.num_classes + (not focal))   # "ce": last class = no object
        self.box_head = MLP(dim, dim, dim, 4)
        for module in (self.decoder, self.class_head, self.box_head):
            module.apply(_init_weights)
        nn.init.normal_(self.decoder.queries)
        if focal:  # every class starts at probability 0.01 (RetinaNet's prior), so no-object rules at first
            nn.init.constant_(self.class_head.bias, -math.log((1 - 0.01) / 0.01))
        if config.denoising:  # DN-DETR: a denoising query's content is its (noised) label
            self.label_embed = nn.Embedding(config.num_classes, dim)
        if config.decoder.reference_boxes:  # the first boxes are the anchors
            self.decoder.reset_anchors()
            nn.init.zeros_(self.box_head[-1].weight)
            nn.init.zeros_(self.box_head[-1].bias)
        self.freeze_encoder(config.frozen)

    @property
    def encoder(self) -> nn.Module:
        return self.backbone

    def freeze_encoder(self, frozen: bool = True) -> "DETR":
        """Decoder probing (frozen: no gradient, BatchNorm in eval mode; ``MobileFormer.freeze``) or fine-tuning."""
        self.config = dataclasses.replace(self.config, frozen=frozen)
        self.backbone.freeze(frozen)
        return self

    def forward(self, images: torch.Tensor, mask: torch.Tensor | None = None,
                targets: list[dict] | None = None) -> dict:
        images = self.pixels(images) if self.config.normalize_input else self.pixels.check(images)
        if mask is not None and not mask.any():
            mask = None                                                     # nothing padded: the plain path
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.config.frozen):
            maps = self.backbone.forward_features(images, mask)
        keep = None if mask is None else mobileformer.keep_mask(mask, maps["features"].dtype)
        dn = denoise = None
        if self.training and self.config.denoising and targets is not None:
            dn = detection.noised_targets(targets, groups=self.config.denoising, num_classes=self.config.num_classes)
            denoise = {"content": self.label_embed(dn["labels_in"]), "boxes": dn["boxes_in"], "group": dn["group"],
                       "valid": dn["valid"]}
        states, box = self.decoder(maps["features"], maps["stride8"], keep, box_head=self.box_head,
                                   denoise=denoise)                         # (L, B, T, ·)
        logits = self.class_head(states)
        box = self.box_head(states).sigmoid() if box is None else box
        q = self.config.decoder.num_queries
        layers = [{"pred_logits": lg[:, :q], "pred_boxes": bx[:, :q]} for lg, bx in zip(logits, box)]
        out = {**layers[-1], "aux_outputs": layers[:-1]}
        if dn is not None:
            out["dn_outputs"] = [{"pred_logits": lg[:, q:], "pred_boxes": bx[:, q:]} for lg, bx in zip(logits, box)]
            out["dn_targets"] = dn
        return out

    @classmethod
    def from_config(cls, config: dict, *, encoder: nn.Module) -> "DETR":
        """``EncoderModel.from_config``; a file written before ``normalize_input`` existed gets False (raw pixels),
        one written before ``position_layout`` DETR's "axes" layout."""
        decoder = {"position_layout": "axes", **config["decoder"]}
        return super().from_config({"normalize_input": False, **config, "decoder": decoder}, encoder=encoder)


def _init_weights(m: nn.Module):
    """Mobile-Former's initialisation (mobileformer A9) for the decoder and heads."""
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, (2.0 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels)) ** 0.5)
    elif isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Linear):
        nn.init.normal_(m.weight, 0.0, 0.01)
        nn.init.zeros_(m.bias)


def create(encoder: nn.Module | str, *, decoder: str = "mf-dec-522", num_classes: int, num_queries: int = 100,
           frozen: bool = False, **options) -> DETR:
    """A DETR on `encoder` (a MobileFormer, or a `mobileformer.create` name such as "mf-w2880") with decoder
    "mf-dec-522" / "mf-dec-211" (Tables 4/18) or "mf-dec-tiny" (ours, CPU-scale). COCO: num_classes = 91 (DETR's
    ids) or 80 with a category map in `postprocess`. `options` set other fields of DecoderConfig or DETRConfig,
    e.g. position_layout="axes"."""
    if decoder not in PRESETS:
        raise ValueError(f"decoder: unknown decoder {decoder!r}; expected one of {sorted(PRESETS)}")
    fields = {c: {f.name for f in dataclasses.fields(c)} for c in (DecoderConfig, DETRConfig)}
    unknown = sorted(set(options) - fields[DecoderConfig] - fields[DETRConfig])
    if unknown:
        raise ValueError(f"options: unknown DecoderConfig / DETRConfig fields {unknown}")
    if isinstance(encoder, str):
        encoder = mobileformer.create(encoder)
    pick = lambda c: {k: v for k, v in options.items() if k in fields[c]}  # noqa: E731
    config = DETRConfig(decoder=dataclasses.replace(PRESETS[decoder], num_queries=num_queries, **pick(DecoderConfig)),
                        num_classes=num_classes, frozen=frozen, **pick(DETRConfig))
    return DETR(encoder, config)
