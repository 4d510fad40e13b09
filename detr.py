"""DETR with a Mobile-Former decoder (FINOLA App. B, Table 11; Tables 4, 8, 18; App. C).

FINOLA evaluates its encoders on COCO inside DETR (Carion et al., 2020) whose transformer encoder and decoder are
replaced by a Mobile-Former decoder (Mobile-Former, Chen et al., CVPR 2022, §"end-to-end detector"): the 100 object
queries are the decoder's global tokens, and the feature-map stream runs over three scales. This file holds the
decoder, the detector, DETR's Hungarian matcher and set criterion, the box helpers and the post-processing to COCO
results. It imports torch, scipy and our `mobileformer` (whose bridges, Former and lite bottleneck it reuses).

Decoder layout. Table 11's body is missing from our copy of the paper, and the Mobile-Former paper's detection section
could not be retrieved (only its abstract), so the layout below rests on the sentences we have (cited) and on a fit to
the paper's head sizes:
  input : the backbone's final 1/16 map (C = 2880/1440/720 channels) and its stage-3 1/8 map (C/15 channels).
  1/32  : down-conv = dw3×3 stride 2 + pw →256 ("down-conv ... 256 channels", Table 11 caption; "the decoder
          incorporates a downsampling step to ... 1/32", App. B), then `depths[0]` M-F⁺ blocks.
  1/16  : up-conv(1/32 map) = bilinear + dw3×3 + pw (Table 11 caption) + a pw lateral C→256 of the 1/16 map;
          `depths[1]` M-F⁻ blocks.
  1/8   : up-conv(1/16 map) + a pw lateral of the 1/8 map; `depths[2]` M-F⁻ blocks.
  Each scale's map gets a fixed 2-D sine position encoding (DETR's) added at its entry.
  M-F⁺ : Mobile→Former, Former (the 100 queries), a transformer block over the pixels in place of the Mobile
         sub-block, Former→Mobile ("M-F⁺ replaces the Mobile sub-block with a transformer block"). M-F⁻ : the same
         with Mobile-Former's lite bottleneck (dw3×3 ×e → ReLU6 → pw, residual) in its place (Table 11 caption).
  "522"/"211" are the blocks per scale, coarse to fine (5 + 2 + 2 = the "nine-layer" decoder of §5.1). M-F⁺ sits at
  1/32 only: at 800×1333 a pixel transformer block costs 1.5 G there and ~160 G at 1/8.
  The two laterals are inferred from the paper's numbers: the head grows by the same 0.8 M / 2.3 G from W1440 to W2880
  (0.4 M / 1.2 G from W720) for both decoders, which these C-wide layers reproduce.
  One expansion ratio, 6, for the Former FFN, the pixel transformer FFN and the lite bottleneck's depthwise multiplier
  (Table 9's ×6), fitted to the head parameter counts of Tables 4/18 (4 gives 15.2 M, 8 gives 23.6 M for 522 on W2880).
  Heads: DETR's (linear classifier with a no-object class; 3-layer MLP → sigmoid cx, cy, w, h), shared by all layers;
  every block's queries give an output (auxiliary losses, as DETR). Dropout 0.1 (App. C) on the queries between
  blocks; App. C does not say where.

Check against the paper (`python bench.py detr-params`; head = decoder + class/box heads for 91 classes; MAdds =
FLOPs/2 of convs, linears and attention at 800×1333 on the meta device; BN, softmax, element-wise ops not counted):

| head        | W2880            | W1440            | W720             | paper (W2880 / W1440 / W720)               |
|-------------|------------------|------------------|------------------|--------------------------------------------|
| MF-Dec-522  | 19.38 M, 36.9 G  | 18.60 M, 34.6 G  | 18.21 M, 33.4 G  | 19.4 / 18.6 / 18.2 M, 34.6 / 32.3 / 31.1 G |
| MF-Dec-211  |  9.54 M, 20.6 G  |  8.76 M, 18.3 G  |  8.37 M, 17.1 G  |  9.2 /  8.4 /  8.0 M, 15.7 / 13.4 / 12.2 G |

Params fit within 5% (522 within 0.1%); 522's MAdds are 7% high, 211's 31-40% high. No layout that uses one block
type per scale in both decoders fits both: 522 − 2×211 would then be a single 1/32 block of ≈ 2.9 M and ≈ 9 G,
and 211's two such blocks would cost ≈ 18 G, twice its 9.6 G for all blocks (without the fixed layers). The two
decoders must differ in block types or expansions in ways we cannot recover; we keep one structure, fit the params,
and report the MAdds gap.

Padded batches (DETR's images of different sizes, `augment.DetrResize`): `model(images, mask)` takes DETR's padding
mask (B, H, W), True on padding. Boxes are normalized by each image's unpadded size, the sine positions by its unpadded
extent (DETR's cumulative sum of the not-mask), attention never reads padded pixels, and every map is zero on its
padding before a 3×3 conv (`mobileformer.masked`). The up-conv's bilinear ×2 is normalized by the upsampled mask
(the padding gets no weight, so an image's border is read as its own border), then cropped to the finer map. So an
image's predictions do not depend on the padding around it, up to float rounding (with BatchNorm in eval mode, as
DETR's own frozen BatchNorm: `tests/test_detr.py`). DETR itself pads its backbone's input and lets the padding
reach its convs; ours does not.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn

import finola
import mobileformer
from mobileformer import Former, FormerToMobile, LiteBottleneck, MobileToFormer, conv_bn, halve, key_mask, masked


# ---------------------------------------------------------------------------------------------------------------
# Boxes: (cx, cy, w, h) <-> (x0, y0, x1, y1), generalised IoU
# ---------------------------------------------------------------------------------------------------------------
def box_cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)


def box_xyxy_to_cxcywh(boxes: torch.Tensor) -> torch.Tensor:
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)


def _intersection_union(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Intersection and union areas of broadcastable xyxy boxes."""
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    inter = ((torch.minimum(a[..., 2:], b[..., 2:]) - torch.maximum(a[..., :2], b[..., :2])).clamp(min=0)).prod(-1)
    return inter, area_a + area_b - inter


def _giou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Generalised IoU of broadcastable xyxy boxes: IoU − (enclosing − union) / enclosing (Rezatofighi et al.)."""
    inter, union = _intersection_union(a, b)
    enclosing = (torch.maximum(a[..., 2:], b[..., 2:]) - torch.minimum(a[..., :2], b[..., :2])).prod(-1)
    return inter / union - (enclosing - union) / enclosing


def _check_pairs(a: torch.Tensor, b: torch.Tensor):
    if a.dim() != 2 or b.dim() != 2 or a.shape[-1] != 4 or b.shape[-1] != 4:
        raise ValueError(f"a, b: expected (N, 4) and (M, 4) xyxy boxes, got {tuple(a.shape)} and {tuple(b.shape)}")


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU of xyxy boxes a (N, 4) and b (M, 4) → (N, M), in [0, 1]."""
    _check_pairs(a, b)
    inter, union = _intersection_union(a[:, None], b[None])
    return inter / union


def generalized_box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise GIoU of xyxy boxes a (N, 4) and b (M, 4) → (N, M), in [−1, 1]."""
    _check_pairs(a, b)
    return _giou(a[:, None], b[None])


# ---------------------------------------------------------------------------------------------------------------
# Hungarian matching (DETR §3.1)
# ---------------------------------------------------------------------------------------------------------------
def _check_targets(targets: list[dict], batch: int):
    if len(targets) != batch:
        raise ValueError(f"targets: expected {batch} dicts (one per image), got {len(targets)}")
    for i, t in enumerate(targets):
        if "labels" not in t or "boxes" not in t or t["boxes"].shape != (len(t["labels"]), 4):
            raise ValueError(f"targets[{i}]: need 'labels' (n,) and 'boxes' (n, 4) normalized cxcywh")


@torch.no_grad()
def hungarian_match(pred_logits: torch.Tensor, pred_boxes: torch.Tensor, targets: list[dict], *,
                    cost_class: float = 1.0, cost_bbox: float = 5.0,
                    cost_giou: float = 2.0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Optimal one-to-one assignment of predictions to targets, per image: cost = −cost_class·p(class)
    + cost_bbox·L1(cxcywh) − cost_giou·GIoU. pred_logits (B, Q, K+1), pred_boxes (B, Q, 4); targets: per image
    {"labels": (n,), "boxes": (n, 4) normalized cxcywh}. Returns per image (pred_indices, target_indices), int64,
    sorted by prediction, length min(Q, n)."""
    B, Q = pred_logits.shape[:2]
    _check_targets(targets, B)
    prob = pred_logits.flatten(0, 1).softmax(-1)                       # (B·Q, K+1)
    boxes = pred_boxes.flatten(0, 1)
    labels = torch.cat([t["labels"] for t in targets]).to(prob.device, torch.int64)
    tgt = torch.cat([t["boxes"] for t in targets]).to(boxes)
    cost = (cost_bbox * torch.cdist(boxes, tgt, p=1) - cost_class * prob[:, labels]
            - cost_giou * generalized_box_iou(box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(tgt)))
    cost = cost.view(B, Q, -1).float().cpu()
    sizes = [len(t["labels"]) for t in targets]
    matches = [linear_sum_assignment(c[i]) for i, c in enumerate(cost.split(sizes, dim=-1))]
    return [(torch.as_tensor(p, dtype=torch.int64), torch.as_tensor(t, dtype=torch.int64)) for p, t in matches]


# ---------------------------------------------------------------------------------------------------------------
# The Mobile-Former decoder (Table 11)
# ---------------------------------------------------------------------------------------------------------------
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

    def __post_init__(self):
        object.__setattr__(self, "depths", tuple(int(d) for d in self.depths))
        if len(self.depths) != 3 or min(self.depths) < 1:
            raise ValueError(f"depths: need three positive block counts (1/32, 1/16, 1/8), got {self.depths}")
        if self.dim % 4 or self.dim % self.heads or self.dim % self.bridge_heads:
            raise ValueError(f"dim: {self.dim} must divide by 4 (sine encoding), heads={self.heads} "
                             f"and bridge_heads={self.bridge_heads}")
        if self.num_queries < 1:
            raise ValueError(f"num_queries: must be positive, got {self.num_queries}")


PRESETS: dict[str, DecoderConfig] = {
    "mf-dec-522": DecoderConfig(name="mf-dec-522", depths=(5, 2, 2)),
    "mf-dec-211": DecoderConfig(name="mf-dec-211", depths=(2, 1, 1)),
    # Ours: CPU-scale, same structure.
    "mf-dec-tiny": DecoderConfig(name="mf-dec-tiny", depths=(1, 1, 1), dim=64, heads=4, expansion=2),
}


def sine_position_encoding(h: int, w: int, dim: int, *, keep: torch.Tensor | None = None, device=None, dtype=None,
                           temperature: float = 10000.0) -> torch.Tensor:
    """DETR's normalized 2-D sine encoding, (1, dim, h, w), or (B, dim, h, w) with ``keep`` (B, 1, h, w) (1 on each
    image, 0 on its padding): dim/2 channels for y, dim/2 for x (sin, cos halves) of the pixel centre's position
    (i + 0.5) / (the image's own extent) · 2π, counted as DETR does by a cumulative sum of ``keep``."""
    keep = torch.ones(1, 1, h, w, device=device) if keep is None else keep
    keep = keep[:, 0].float()
    y, x = keep.cumsum(1), keep.cumsum(2)
    y = (y - 0.5) / y[:, -1:].clamp(min=1) * (2 * math.pi)      # finite on padding too (where it is masked)
    x = (x - 0.5) / x[:, :, -1:].clamp(min=1) * (2 * math.pi)
    n = dim // 4
    freq = temperature ** (torch.arange(n, device=keep.device, dtype=torch.float32) / n)
    ey, ex = y[..., None] / freq, x[..., None] / freq                      # (B, h, w, n)
    pe = torch.cat([ey.sin(), ey.cos(), ex.sin(), ex.cos()], dim=-1)       # (B, h, w, dim)
    return pe.permute(0, 3, 1, 2).to(dtype)


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

    def forward(self, x: torch.Tensor, z: torch.Tensor,
                keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.former(self.mobile_to_former(x, z, keep))
        x, _ = self.mobile(x, z, keep)
        return masked(self.former_to_mobile(x, z), keep), z


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
        return self.pw(self.dw(masked(x[..., :size[0], :size[1]], fine)))


class MobileFormerDecoder(nn.Module):
    """The three-scale decoder (module docstring): from the backbone's final 1/16 map (`channels` wide) and its 1/8
    map (`stride8_channels`) to the queries after every block, stacked (L, B, Q, D)."""

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

    def forward(self, features: torch.Tensor, stride8: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """`keep`: the input images' padding mask (B, 1, H, W), 1 on each image; None: no padding."""
        keeps = [halve(keep, k) for k in (5, 4, 3)]                            # at 1/32, 1/16, 1/8
        x, z = masked(self.down(features), keeps[0]), self.queries.expand(features.shape[0], -1, -1)
        skips, states = (features, stride8), []
        for scale, blocks in enumerate(self.stages):
            if scale:
                skip = skips[scale - 1]
                x = (self.ups[scale - 1](x, skip.shape[2:], keeps[scale - 1], keeps[scale])
                     + self.laterals[scale - 1](skip))
            pe = sine_position_encoding(*x.shape[2:], self.config.dim, keep=keeps[scale], device=x.device,
                                        dtype=x.dtype)
            x = masked(x + pe, keeps[scale])
            for block in blocks:
                x, z = block(x, self.dropout(z) if states else z, keeps[scale])       # dropout between blocks (App. C)
                states.append(z)
        return torch.stack(states)


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
    num_classes: int                  # real classes; the classifier adds one for no-object
    frozen: bool = False              # decoder probing: no gradient into the encoder, its BatchNorm in eval mode
    normalize_input: bool = True      # False: files written before the fix, whose encoders saw raw pixels

    def __post_init__(self):
        if isinstance(self.decoder, dict):  # from a weights file's JSON
            object.__setattr__(self, "decoder", DecoderConfig(**self.decoder))
        if self.num_classes < 1:
            raise ValueError(f"num_classes: must be positive, got {self.num_classes}")


class DETR(finola.EncoderModel):
    """Encoder (a Mobile-Former, DETR's "backbone") + Mobile-Former decoder + DETR heads. `model(images, mask=None)`
    → {"pred_logits": (B, Q, K+1), "pred_boxes": (B, Q, 4) cxcywh in [0, 1], "aux_outputs": [{...}] × (L − 1)}.
    `images` are in [0, 1]; `mask` (B, H, W) is True on the padding of a padded batch (module docstring), and boxes
    are relative to each image's unpadded size. The encoder sees images normalized as every encoder here is trained
    (`PixelNorm`), unless `normalize_input=False`. Its tensors keep DETR's name, `backbone.*`; `model.encoder` is
    the same module."""

    Config = DETRConfig
    RENAMED = {"backbone": "encoder", "frozen_backbone": "frozen"}  # files before the model contract

    def __init__(self, encoder: nn.Module, config: DETRConfig):
        super().__init__()
        if not (hasattr(encoder, "forward_features") and hasattr(encoder, "map_channels")):
            raise ValueError("encoder: need a multi-scale encoder with forward_features() and map_channels "
                             f"(a mobileformer.MobileFormer), got {type(encoder).__name__}")
        self.config = config
        self.pixels = finola.PixelNorm()
        self.backbone = encoder
        ch, dim = encoder.map_channels, config.decoder.dim
        self.decoder = MobileFormerDecoder(config.decoder, channels=ch["features"], stride8_channels=ch["stride8"])
        self.class_head = nn.Linear(dim, config.num_classes + 1)          # last class = no object
        self.box_head = MLP(dim, dim, dim, 4)
        for module in (self.decoder, self.class_head, self.box_head):
            module.apply(_init_weights)
        nn.init.normal_(self.decoder.queries)
        self.freeze_encoder(config.frozen)

    @property
    def encoder(self) -> nn.Module:
        return self.backbone

    def freeze_encoder(self, frozen: bool = True) -> "DETR":
        """Decoder probing (frozen: no gradient, BatchNorm in eval mode; ``MobileFormer.freeze``) or fine-tuning."""
        self.config = dataclasses.replace(self.config, frozen=frozen)
        self.backbone.freeze(frozen)
        return self

    def forward(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> dict:
        images = self.pixels(images) if self.config.normalize_input else self.pixels.check(images)
        if mask is not None and not mask.any():
            mask = None                                                     # nothing padded: the plain path
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.config.frozen):
            maps = self.backbone.forward_features(images, mask)
        keep = None if mask is None else mobileformer.keep_mask(mask, maps["features"].dtype)
        states = self.decoder(maps["features"], maps["stride8"], keep)     # (L, B, Q, D)
        logits, boxes = self.class_head(states), self.box_head(states).sigmoid()
        return {"pred_logits": logits[-1], "pred_boxes": boxes[-1],
                "aux_outputs": [{"pred_logits": lg, "pred_boxes": bx} for lg, bx in zip(logits[:-1], boxes[:-1])]}

    @classmethod
    def from_config(cls, config: dict, *, encoder: nn.Module) -> "DETR":
        """``EncoderModel.from_config``; a file written before ``normalize_input`` existed gets False (raw pixels)."""
        return super().from_config({"normalize_input": False, **config}, encoder=encoder)


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
           frozen: bool = False) -> DETR:
    """A DETR on `encoder` (a MobileFormer, or a `mobileformer.create` name such as "mf-w2880") with decoder
    "mf-dec-522" / "mf-dec-211" (Tables 4/18) or "mf-dec-tiny" (ours, CPU-scale). COCO: num_classes = 91 (DETR's
    ids) or 80 with a category map in `postprocess`."""
    if decoder not in PRESETS:
        raise ValueError(f"decoder: unknown decoder {decoder!r}; expected one of {sorted(PRESETS)}")
    if isinstance(encoder, str):
        encoder = mobileformer.create(encoder)
    config = DETRConfig(decoder=dataclasses.replace(PRESETS[decoder], num_queries=num_queries),
                        num_classes=num_classes, frozen=frozen)
    return DETR(encoder, config)


# ---------------------------------------------------------------------------------------------------------------
# Set criterion (DETR §3.1): CE with no-object weight 0.1, L1 ×5, GIoU ×2, on every decoder layer
# ---------------------------------------------------------------------------------------------------------------
def _global_num_boxes(targets: list[dict], device) -> float:
    """Boxes in the batch averaged over processes (all_reduce when torch.distributed is initialised), at least 1."""
    n = torch.tensor(float(sum(len(t["labels"]) for t in targets)), device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(n)
        n = n / dist.get_world_size()
    return max(n.item(), 1.0)


class SetCriterion(nn.Module):
    """`criterion(outputs, targets, num_boxes=None)` → {"loss": weighted sum over all layers, "loss_ce", "loss_bbox",
    "loss_giou": the last layer's unweighted terms}. L1 and GIoU are summed over matched boxes and divided by
    `num_boxes` (default: the batch's boxes averaged across processes); CE is averaged over all queries with
    class weights 1 and `eos_coef` for no-object."""

    def __init__(self, num_classes: int, *, eos_coef: float = 0.1, weight_ce: float = 1.0, weight_bbox: float = 5.0,
                 weight_giou: float = 2.0, cost_class: float = 1.0, cost_bbox: float = 5.0, cost_giou: float = 2.0):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes: must be positive, got {num_classes}")
        self.num_classes = num_classes
        self.weights = {"loss_ce": weight_ce, "loss_bbox": weight_bbox, "loss_giou": weight_giou}
        self.costs = {"cost_class": cost_class, "cost_bbox": cost_bbox, "cost_giou": cost_giou}
        class_weight = torch.ones(num_classes + 1)
        class_weight[-1] = eos_coef
        self.register_buffer("class_weight", class_weight, persistent=False)

    def layer_losses(self, logits: torch.Tensor, boxes: torch.Tensor, targets: list[dict],
                     num_boxes: float) -> dict[str, torch.Tensor]:
        """Unweighted CE, L1 and GIoU terms of one decoder layer's outputs."""
        if logits.shape[-1] != self.num_classes + 1:
            raise ValueError(f"outputs: pred_logits has {logits.shape[-1]} classes, expected "
                             f"num_classes + 1 = {self.num_classes + 1}")
        indices = hungarian_match(logits, boxes, targets, **self.costs)
        batch = torch.cat([torch.full_like(p, i) for i, (p, _) in enumerate(indices)]).to(logits.device)
        query = torch.cat([p for p, _ in indices]).to(logits.device)
        labels = torch.cat([t["labels"][j.to(t["labels"].device)] for t, (_, j) in zip(targets, indices)])
        tgt = torch.cat([t["boxes"][j.to(t["boxes"].device)] for t, (_, j) in zip(targets, indices)]).to(boxes)
        classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device)
        classes[batch, query] = labels.to(logits.device, torch.int64)
        src = boxes[batch, query]
        return {"loss_ce": F.cross_entropy(logits.transpose(1, 2), classes, weight=self.class_weight.to(logits)),
                "loss_bbox": F.l1_loss(src, tgt, reduction="sum") / num_boxes,
                "loss_giou": (1 - _giou(box_cxcywh_to_xyxy(src), box_cxcywh_to_xyxy(tgt))).sum() / num_boxes}

    def forward(self, outputs: dict, targets: list[dict], *, num_boxes: float | None = None) -> dict:
        _check_targets(targets, outputs["pred_logits"].shape[0])
        if num_boxes is None:
            num_boxes = _global_num_boxes(targets, outputs["pred_logits"].device)
        layers = [*outputs.get("aux_outputs", []), outputs]
        total = 0.0
        for layer in layers:
            terms = self.layer_losses(layer["pred_logits"], layer["pred_boxes"], targets, num_boxes)
            total = total + sum(self.weights[k] * v for k, v in terms.items())
        return {"loss": total, **terms}


# ---------------------------------------------------------------------------------------------------------------
# Post-processing to COCO results
# ---------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def postprocess(outputs: dict, orig_sizes, *, image_ids, category_ids=None) -> list[dict]:
    """COCO result dicts {"image_id", "category_id", "bbox": [x, y, w, h] in pixels, "score"}, one per query (as DETR
    submits). Score and label: the best real class of the softmax (no-object excluded). `orig_sizes` (B, 2) is
    (height, width) of the original images, the extent the normalized boxes span; `category_ids[k]` is the COCO id of
    contiguous label k (default: the label itself)."""
    logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
    B, Q = logits.shape[:2]
    sizes = torch.as_tensor(orig_sizes, dtype=torch.float32).to(boxes.device)
    ids = torch.as_tensor(image_ids, dtype=torch.int64)
    if sizes.shape != (B, 2) or ids.shape != (B,):
        raise ValueError(f"orig_sizes, image_ids: expected ({B}, 2) and ({B},), got {tuple(sizes.shape)} "
                         f"and {tuple(ids.shape)}")
    scores, labels = logits.softmax(-1)[..., :-1].max(-1)
    xyxy = box_cxcywh_to_xyxy(boxes.float()) * sizes.flip(-1).repeat(1, 2)[:, None]   # (w, h, w, h) per image
    xywh = torch.cat([xyxy[..., :2], xyxy[..., 2:] - xyxy[..., :2]], dim=-1)
    if category_ids is not None:
        category_ids = torch.as_tensor(category_ids, dtype=torch.int64)
        if len(category_ids) != logits.shape[-1] - 1:
            raise ValueError(f"category_ids: need one COCO id per class ({logits.shape[-1] - 1}), "
                             f"got {len(category_ids)}")
        labels = category_ids.to(labels.device)[labels]
    return [{"image_id": i, "category_id": c, "bbox": b, "score": s}
            for i, c, b, s in zip(ids[:, None].expand(B, Q).flatten().tolist(), labels.flatten().tolist(),
                                  xywh.flatten(0, 1).tolist(), scores.flatten().tolist())]
