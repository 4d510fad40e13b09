"""Augment: the paper's augmentations (Tables 12-14) and the evaluation resizes, a batch at a time, on decoded uint8
images (:class:`Decoded`).

Training (:func:`train_transform`): RandomResizedCrop + horizontal flip (pre-training, Table 12; linear probing,
Table 13), then RandAugment(9, 0.5) (tran-1 probing, Table 13; fine-tuning, Table 14) and RandomErasing (Table 14)
when asked; detection follows DETR's resizes and crops (:class:`DetrResize`), boxes with the images, in zero-padded
batches. Evaluation (:func:`eval_transform`): resize the shorter side and centre-crop (classification), or DETR's
resize (detection). Every sample's box and flip are drawn at
once (:func:`crop_boxes`) and all crops resized in a few batched ops (:func:`resized_crops`). Data sources, the
decoded-image cache and the loader that calls ``transform.batch`` live in data.py.
"""
from __future__ import annotations

import math

import kornia.augmentation as K
import numpy as np
import torch
from PIL import Image


# ----------------------------------------------------------------------------------------------------------------
# Decoded images: uint8 pixels, and the box-filtered pyramid that large downscales resample from
# ----------------------------------------------------------------------------------------------------------------
class Decoded:
    """A decoded image: ``pixels`` uint8 (3, H, W), or (1, H, W) for a grey one (read as RGB with three equal
    channels), and on demand its box-filtered pyramid (``level(L)``: the mean of each 2^L × 2^L block,
    ``floor(H / 2^L) × floor(W / 2^L)``, so level-L pixel k covers level-0 pixels [k·2^L, (k+1)·2^L)), from which
    large downscales are resampled."""

    __slots__ = ("pixels", "pyramid")  # few objects per image: a full cache (data.ImageCache) stays cheap for the GC

    def __init__(self, pixels: torch.Tensor):
        self.pixels, self.pyramid = pixels, None  # pyramid: levels 1, 2, … once asked for

    @classmethod
    def from_pil(cls, image: Image.Image) -> "Decoded":
        if image.mode == "L":
            return cls(torch.from_numpy(np.array(image))[None])
        image = image if image.mode == "RGB" else image.convert("RGB")
        return cls(torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous())

    @property
    def size(self) -> tuple[int, int]:
        """(H, W)"""
        return tuple(self.pixels.shape[1:])

    def level(self, L: int) -> torch.Tensor:
        if L == 0:
            return self.pixels
        pyramid = self.pyramid or []
        if len(pyramid) < L:  # halve in float (means of means of equal blocks: exact), store rounded
            x = self.pixels[None].float()
            for i in range(1, L + 1):
                x = torch.nn.functional.avg_pool2d(x, 2)
                if i > len(pyramid):
                    pyramid.append(x[0].round().to(torch.uint8))
            self.pyramid = pyramid
        return pyramid[L - 1]

    def rgb(self) -> torch.Tensor:
        """(3, H, W) uint8"""
        return self.pixels.expand(3, -1, -1)

    def pil(self) -> Image.Image:
        return Image.fromarray(self.rgb().permute(1, 2, 0).contiguous().numpy())


# ----------------------------------------------------------------------------------------------------------------
# Batched crops: every sample's box drawn at once, cropped and resized in a few batched ops
# ----------------------------------------------------------------------------------------------------------------
def crop_boxes(sizes: torch.Tensor, *, scale: tuple[float, float] = (0.08, 1.0),
               ratio: tuple[float, float] = (3 / 4, 4 / 3), tries: int = 10,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """RandomResizedCrop's boxes for a batch: ``sizes`` (B, 2) = (H, W) per image → (B, 4) integer-valued float
    ``x0, y0, w, h``. torchvision's algorithm, vectorised: up to ``tries`` draws of an area fraction uniform in
    ``scale`` and a log-uniform aspect ratio w/h in ``ratio``, the first that fits is taken; none fits → the largest
    centred box of the ratio range (the whole image when its own ratio is in range); the position is uniform."""
    H, W = sizes.double().unbind(1)
    B = len(sizes)
    area = (H * W)[:, None] * (scale[0] + (scale[1] - scale[0]) * torch.rand(B, tries, generator=generator,
                                                                             dtype=torch.float64))
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * torch.rand(B, tries, generator=generator, dtype=torch.float64))
    w, h = (area * aspect).sqrt().round(), (area / aspect).sqrt().round()
    fits = (w > 0) & (w <= W[:, None]) & (h > 0) & (h <= H[:, None])
    first = fits.to(torch.uint8).argmax(1, keepdim=True)  # the first try that fits
    w, h, found = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0], fits.any(1)
    own = W / H  # fallback: torchvision's centre crop
    fw = torch.where(own < min(ratio), W, torch.where(own > max(ratio), (H * max(ratio)).round(), W))
    fh = torch.where(own < min(ratio), (W / min(ratio)).round(), H)
    w, h = torch.where(found, w, fw), torch.where(found, h, fh)
    u = torch.rand(B, 2, generator=generator, dtype=torch.float64)
    x0 = torch.minimum((u[:, 0] * (W - w + 1)).floor(), W - w)
    y0 = torch.minimum((u[:, 1] * (H - h + 1)).floor(), H - h)
    x0 = torch.where(found, x0, ((W - w) / 2).floor())  # torchvision: (W - w) // 2
    y0 = torch.where(found, y0, ((H - h) / 2).floor())
    return torch.stack([x0, y0, w, h], 1).float()


def centre_boxes(sizes: torch.Tensor, *, size: int, crop_ratio: float) -> torch.Tensor:
    """The boxes (B, 4) ``x0, y0, w, h`` (fractional) that "resize the shorter side to ``round(size / crop_ratio)``
    (the longer one to ⌊that × its ratio⌋), then centre-crop ``size``² at the rounded offset" (torchvision's
    Resize + CenterCrop) cuts from images of ``sizes`` (B, 2) = (H, W); resampled with ``clip="image"`` they are
    that resize then crop."""
    H, W = sizes.double().unbind(1)
    short = round(size / crop_ratio)
    h = torch.where(H <= W, torch.full_like(H, short), (short * H / W).floor())
    w = torch.where(H <= W, (short * W / H).floor(), torch.full_like(W, short))
    top, left = ((h - size) / 2).round(), ((w - size) / 2).round()
    return torch.stack([left * W / w, top * H / h, size * W / w, size * H / h], 1).float()


def _taps(start, length, lo, hi, out, flip=None):
    """PyTorch's antialiased bilinear weights (``F.interpolate(..., antialias=True)``: a triangle of half-width
    max(scale, 1) at the output pixel's centre, normalized) along one axis of every sample: output pixel j of
    sample b reads source pixels ``origin[b] + arange(P)`` with weights ``w[b, j]``; pixels outside [lo, hi) get
    none. ``start``, ``length``, ``lo``, ``hi``: (B,) float64, in source pixels; ``out``: the output length, an int
    or (B,) per sample (rows past a sample's length get no weight: zero padding); ``flip`` (B,) bool mirrors."""
    out = torch.as_tensor(out, dtype=torch.float64).expand(len(start))
    scale = length / out
    support = scale.clamp(min=1.0)
    j = torch.arange(int(out.max()), dtype=torch.float64)
    pos = j.minimum(out[:, None] - 1)
    if flip is not None:
        pos = torch.where(flip[:, None], out[:, None] - 1 - pos, pos)
    centre = start[:, None] + scale[:, None] * (pos + 0.5)
    origin = torch.maximum((centre.amin(1) - support).floor(), lo)
    end = torch.minimum((centre.amax(1) + support).ceil(), hi)
    P = max(int((end - origin).max()), 1)
    offset = (centre - origin[:, None] - 0.5).float()  # (B, out): centres from pixel origin's centre
    v = torch.arange(P, dtype=torch.float32)
    w = (v - offset[:, :, None]).mul_((1 / support).float()[:, None, None]).abs_().neg_().add_(1).clamp_(min=0)
    inside = (v >= (lo - origin).float()[:, None]) & (v < (hi - origin).float()[:, None])  # (B, P)
    w.mul_(inside[:, None, :] & (j < out[:, None])[:, :, None])
    w.div_(w.sum(-1, keepdim=True).clamp_(min=1e-12))
    return origin.long(), w


def resized_crops(images: list[Decoded], boxes: torch.Tensor, size, flip: torch.Tensor | None = None, *,
                  clip: str = "box") -> torch.Tensor:
    """Crop ``boxes`` (B, 4) ``x0, y0, w, h`` in pixels (fractional allowed) out of ``images`` and resize each to
    ``size``², mirrored where ``flip`` (B,) is true: (B, 3, size, size) float in [0, 1], in a few batched ops. With
    ``size`` a (B, 2) tensor of (h, w) per sample: (B, 3, max h, max w), each sample top-left and zero beyond its own
    (h, w) (DETR's padded batch).

    Antialiased like ``F.interpolate(crop, mode="bilinear", antialias=True)`` (``clip="box"``: the crop is cut
    first, so the filter stops at its edges; ``clip="image"``: resize then crop, the filter reads past the box).
    A downscale d ≥ 2 reads the image's pyramid level L = ⌊log2 d⌋ (box means, cached with the image), then the
    exact filter at the remaining scale d / 2^L < 2, so each sample touches at most about (2·size + 4)² pixels.
    All regions are gathered into one (B, 3, P, P) canvas through a strided view of the batch's pixels (one
    channel when every image is grey), and resampled as ``Wy @ canvas @ Wxᵀ`` with per-sample weight matrices
    (the flip reverses ``Wx``)."""
    boxes = boxes.double()
    B = len(images)
    if B == 0:
        return torch.empty(0, 3, size, size) if isinstance(size, int) else torch.empty(0, 3, 0, 0)
    out_hw = torch.as_tensor(size, dtype=torch.float64).expand(B, 2)        # (h, w) per sample
    d = (boxes[:, 2:] / out_hw.flip(1)).amin(1).clamp(min=1.0)
    L = d.log2().floor().long().clamp(min=0)
    # the batch's distinct (image, level) planes, flattened one after another
    planes, ids, where = {}, [], []
    for image, level in zip(images, L.tolist()):  # bookkeeping only: no pixel work per sample
        key = (id(image), level)
        if key not in planes:
            planes[key] = len(planes)
            where.append(image.level(level))
        ids.append(planes[key])
    sizes = torch.tensor([p.shape[1:] for p in where], dtype=torch.float64)  # (U, 2) H_L, W_L
    colour = torch.tensor([len(p) > 1 for p in where])  # grey planes: the same pixels for R, G and B
    offsets = torch.tensor([0] + [p.numel() for p in where]).cumsum(0)
    ids = torch.tensor(ids)
    HL, WL = sizes[ids].unbind(1)
    f = (2.0 ** L).double()
    x0, y0, w, h = (boxes / f[:, None]).unbind(1)
    if clip == "box":
        lo_x, lo_y = x0.floor(), y0.floor()
        hi_x, hi_y = torch.minimum((x0 + w).ceil(), WL), torch.minimum((y0 + h).ceil(), HL)
    elif clip == "image":
        lo_x = lo_y = torch.zeros(B, dtype=torch.float64)
        hi_x, hi_y = WL, HL
    else:
        raise ValueError(f"clip={clip!r}: expected 'box' or 'image'")
    rx, wx = _taps(x0, w, lo_x, hi_x, out_hw[:, 1], flip)
    ry, wy = _taps(y0, h, lo_y, hi_y, out_hw[:, 0])
    Pw, Ph = wx.shape[-1], wy.shape[-1]
    # canvas[b, c, u] = the Pw pixels of row ry + u from column rx (past the right edge: the next row's pixels,
    # which get no weight; rows past the bottom repeat the last row, also without weight)
    flat = torch.cat([p.reshape(-1) for p in where] + [torch.zeros(Pw, dtype=torch.uint8)])
    rows = (ry[:, None] + torch.arange(Ph)).minimum(HL.long()[:, None] - 1)  # (B, Ph)
    C = 3 if colour.any() else 1  # a batch of grey images is resampled once and repeated
    plane = (HL * WL).long() * colour[ids]
    starts = (offsets[ids][:, None, None] + torch.arange(C)[None, :, None] * plane[:, None, None]
              + rows[:, None, :] * WL.long()[:, None, None] + rx[:, None, None])
    canvas = flat.unfold(0, Pw, 1)[starts].float()  # (B, C, Ph, Pw)
    columns = (canvas.reshape(B, C * Ph, Pw) @ wx.transpose(1, 2)).reshape(B, C, Ph, wx.shape[1])
    out = torch.matmul(wy.mul_(1 / 255)[:, None], columns).clamp_(0, 1)
    return out if C == 3 else out.expand(B, 3, *out.shape[2:]).contiguous()


class _RandAugment:
    """kornia's ``RandAugment(n, m)`` with every image drawing its own ``n`` distinct operations (as timm; kornia
    draws one set for a whole batch): per slot, the images are grouped by the operation they drew, and each
    group goes through that operation (kornia's, with its per-image signs) in one call."""

    def __init__(self, n: int = 2, m: int = 27):
        from kornia.augmentation.auto.rand_augment.rand_augment import default_policy

        self.n, self.ops = n, [K.auto.RandAugment(n=1, m=m, policy=[p]) for p in default_policy]

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        drawn = torch.rand(len(x), len(self.ops), generator=generator).argsort(1)[:, :self.n]
        for slot in drawn.T:
            for op in slot.unique().tolist():
                chosen = (slot == op).nonzero()[:, 0]
                x[chosen] = self.ops[op](x[chosen])
        return x


# ----------------------------------------------------------------------------------------------------------------
# Colour jitter (ours, ``--colour-jitter``; not in the paper): kornia's ColorJiggle, in fewer ops
# ----------------------------------------------------------------------------------------------------------------
def brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """x + (factor - 1), clamped to [0, 1] (kornia's additive ``adjust_brightness``); ``factor`` (B, 1, 1, 1)."""
    return (x + (factor - 1)).clamp_(0, 1)


def contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """x · factor, clamped to [0, 1] (kornia's multiplicative ``adjust_contrast``)."""
    return (x * factor).clamp_(0, 1)


def _extremes(x: torch.Tensor):
    """V = max(R, G, B), the min, and Δ = V - min (B, 1, H, W): HSV's value and chroma."""
    hi, lo = x.amax(1, keepdim=True), x.amin(1, keepdim=True)
    return hi, lo, hi - lo


def saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """HSV saturation S = Δ / V times ``factor``, clamped to [0, 1], hue and V kept: each channel's distance from the
    min channel rescaled to the new chroma V S' (kornia's ``adjust_saturation``)."""
    hi, lo, delta = _extremes(x)
    s = (delta / torch.where(hi == 0, 1.0, hi + 1e-8) * factor).clamp_(0, 1)
    chroma = hi * s
    return (x - lo) * (chroma / torch.where(delta == 0, 1.0, delta)) + (hi - chroma)


_SEXTANT_OFFSET = torch.tensor([5.0, 3.0, 1.0]).view(1, 3, 1, 1)  # R, G, B in HSV -> RGB's closed form


def hue(x: torch.Tensor, turns: torch.Tensor) -> torch.Tensor:
    """The HSV hue rotated by ``turns`` of the colour circle, S and V kept (kornia's ``adjust_hue`` with the angle
    2π · turns), without building the HSV image: hue h ∈ [0, 6) sextants from the max channel, then each channel
    c = V - Δ · clamp(min(k, 4 - k), 0, 1) with k = (n_c + h') mod 6, n = 5, 3, 1 for R, G, B."""
    hi, _, delta = _extremes(x)
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    d = torch.where(delta == 0, 1.0, delta)
    h = torch.where((r >= g) & (r >= b), (g - b) / d, torch.where(g >= b, (b - r) / d + 2, (r - g) / d + 4))
    k = (h + 6 * turns + _SEXTANT_OFFSET).remainder_(6)
    return hi - delta * torch.minimum(k, 4 - k).clamp_(0, 1)


class ColourJitter:
    """Per image: brightness, contrast and saturation factors in [1 - strength, 1 + strength] (floored at 0) and a
    hue rotation of up to ± strength / 4 turns, applied in one random order per batch, each step clamped to [0, 1]:
    the distribution of kornia's ``ColorJiggle(s, s, s, s / 4)`` (the same four steps, EXPERIMENTS.md, Speed), drawn
    from the loader's generator and computed in a few fused ops."""

    STEPS = (brightness, contrast, saturation, hue)

    def __init__(self, strength: float):
        if not 0 < strength <= 1:
            raise ValueError(f"colour: jitter strength {strength} must be in (0, 1]")
        self.strength = strength

    def draw(self, n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, list[int]]:
        """(factors (n, 4): brightness, contrast, saturation, hue turns; the order of the four steps)."""
        s = self.strength
        low = torch.tensor([max(0.0, 1 - s)] * 3 + [-s / 4])
        high = torch.tensor([1 + s] * 3 + [s / 4])
        factors = low + (high - low) * torch.rand(n, 4, generator=generator)
        return factors, torch.randperm(4, generator=generator).tolist()

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        factors, order = self.draw(len(x), generator)
        x = x.clamp(0, 1)
        for i in order:
            x = self.STEPS[i](x, factors[:, i].view(-1, 1, 1, 1))
        return x


# ----------------------------------------------------------------------------------------------------------------
# Transforms (Tables 12-14), a batch at a time (``transform.batch``): each sample draws its own box, flip and
# (RandAugment) operations; detection boxes move with their images. Label smoothing (0.1, Table 13) is a loss
# setting: `F.cross_entropy(..., label_smoothing=0.1)`; nothing here.
# ----------------------------------------------------------------------------------------------------------------
class Transform:
    """``transform(image: PIL)`` → (3, h, w) float in [0, 1]; a detection transform (``detection = True``) also takes
    ``boxes`` (n, 4) xyxy in pixels and returns ``(image, boxes, keep)``: the boxes moved with the image, clipped to
    it, and ``keep`` marking those still at least 1 px wide and high. The loader calls ``transform.batch(images:
    list[Decoded], generator)``, which returns the (B, 3, size, size) batch, or for detection ``(x, sizes, boxes,
    keep)``: the zero-padded batch, each image's own (h, w) (B, 2), and with ``boxes=`` the boxes moved per image."""

    detection = False

    def __init__(self, *, size: int):
        self.size = size

    def __call__(self, image: Image.Image, boxes: torch.Tensor | None = None):
        decoded = [Decoded.from_pil(image)]
        if not self.detection:
            return self.batch(decoded)[0]
        x, _, moved, keep = self.batch(decoded, boxes=None if boxes is None else [boxes])
        return x[0] if boxes is None else (x[0], moved[0], keep[0])

    def batch(self, images: list[Decoded], generator: torch.Generator | None = None):
        raise NotImplementedError


class Crops(Transform):
    """A box per image, resized to ``size``² by :func:`resized_crops`: ``mode="random"`` RandomResizedCrop
    (:func:`crop_boxes`) + horizontal flip, then RandAugment and RandomErasing when asked; ``"centre"`` the centre
    crop of evaluation (:func:`centre_boxes`)."""

    def __init__(self, *, size: int, mode: str, scale=(0.08, 1.0), crop_ratio: float = 0.875,
                 randaug: bool = False, erase: float = 0.0, colour: float = 0.0):
        if mode not in ("random", "centre"):
            raise ValueError(f"mode={mode!r}: expected 'random' or 'centre'")
        super().__init__(size=size)
        self.mode, self.scale, self.crop_ratio = mode, tuple(scale), crop_ratio
        self.randaug = _RandAugment(n=2, m=27) if randaug else None
        self.erasing = K.RandomErasing(p=erase) if erase > 0 else None
        self.colour = ColourJitter(colour) if colour > 0 else None

    def batch(self, images: list[Decoded], generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, 3, size, size). ``generator`` draws the boxes, flips, colour jitter and RandAugment's operations;
        kornia's own draws (RandAugment's signs, RandomErasing) come from torch's global generator, which the loader
        seeds for each batch."""
        sizes = torch.tensor([image.size for image in images], dtype=torch.float64).reshape(-1, 2)
        flip = None
        if self.mode == "random":
            crops = crop_boxes(sizes, scale=self.scale, generator=generator)
            flip = torch.rand(len(images), generator=generator) < 0.5
        else:
            crops = centre_boxes(sizes, size=self.size, crop_ratio=self.crop_ratio)
        x = resized_crops(images, crops, self.size, flip, clip="box" if self.mode == "random" else "image")
        if self.colour is not None:
            x = self.colour(x, generator)
        if self.randaug is not None:
            x = self.randaug(x, generator)
        if self.erasing is not None:
            x = self.erasing(x)
        return x


# ----------------------------------------------------------------------------------------------------------------
# Detection (DETR's geometry): images of their own aspect ratio and size, in zero-padded batches
# ----------------------------------------------------------------------------------------------------------------
def resized_size(h: torch.Tensor, w: torch.Tensor, short: torch.Tensor, max_size: float | None = None):
    """DETR's ``get_size_with_aspect_ratio``, per sample (float64 tensors): the (h, w) with the shorter side
    ``short``, lowered to ``round(max_size · short side / long side)`` where the longer side would pass ``max_size``;
    the longer side is ⌊short · its ratio⌋ (DETR's ``int``)."""
    lo, hi = torch.minimum(h, w), torch.maximum(h, w)
    if max_size is not None:
        short = torch.where(hi / lo * short > max_size, (max_size * lo / hi).round(), short)
    long = (short * hi / lo).floor()
    return torch.where(h <= w, short, long), torch.where(h <= w, long, short)


def move_boxes(boxes: list[torch.Tensor], crops: torch.Tensor, out: torch.Tensor, flip: torch.Tensor | None):
    """Boxes (per image (n, 4) xyxy in source pixels) moved with their crop boxes ``crops`` (B, 4) ``x0, y0, w, h``
    resized to ``out`` (B, 2) = (h, w) and mirrored where ``flip``: clipped to the image, with ``keep`` (at least
    1 px wide and high)."""
    counts = [len(b) for b in boxes]
    of = torch.repeat_interleave(torch.arange(len(crops)), torch.tensor(counts, dtype=torch.long))
    wh = out.flip(1).float()[of]
    crops = crops.float()[of]
    moved = (torch.cat(boxes).reshape(-1, 4) - crops[:, :2].repeat(1, 2)) * (wh / crops[:, 2:]).repeat(1, 2)
    if flip is not None:  # x0, x1 -> w - x1, w - x0
        mirrored = torch.stack([wh[:, 0] - moved[:, 2], moved[:, 1], wh[:, 0] - moved[:, 0], moved[:, 3]], 1)
        moved = torch.where(flip[of, None], mirrored, moved)
    moved = torch.minimum(moved.clamp(min=0), wh.repeat(1, 2))
    keep = ((moved[:, 2:] - moved[:, :2]) >= 1).all(1)
    return list(moved.split(counts)), list(keep.split(counts))


class DetrResize(Transform):
    """DETR's detection geometry (Carion et al. 2020, its COCO transforms), every side scaled by ``size`` / 800.
    Training: horizontal flip (p 0.5); then with p 0.5 the shorter side resized to one of 480, 512, …, 800 with the
    longer side at most 1333, else resized to 400 / 500 / 600, a random crop of 384…600 px a side (uniform size and
    place) and that same random resize of the crop. Evaluation: the shorter side to ``size`` (800), the longer at
    most 1333. Aspect ratios are kept (:func:`resized_size`); a side below ``min_side`` (the encoder's 32) is raised
    to it. The crop branch's two resizes are one resample of the crop's box in the decoded image. At the small
    presets' ``size`` 64: shorter sides 38, 41, …, 64 (11 of them), longer ≤ 107, crops from 32 / 40 / 48 of 32…48."""

    detection = True

    def __init__(self, *, size: int, train: bool, min_side: int = 32):
        super().__init__(size=size)
        side = lambda s: max(round(s * size / 800), min_side)  # noqa: E731
        self.train, self.min_side, self.max_size = train, min_side, round(1333 * size / 800)
        self.scales = torch.tensor([side(s) for s in range(480, 801, 32)] if train else [size], dtype=torch.float64)
        self.crop_scales = torch.tensor([side(s) for s in (400, 500, 600)], dtype=torch.float64)
        self.crop_sides = (side(384), side(600))

    def batch(self, images: list[Decoded], generator: torch.Generator | None = None,
              boxes: list[torch.Tensor] | None = None):
        sizes = torch.tensor([image.size for image in images], dtype=torch.float64).reshape(-1, 2)
        B, (H, W) = len(images), sizes.unbind(1)
        crops = torch.stack([torch.zeros_like(W), torch.zeros_like(H), W, H], 1)  # x0, y0, w, h in the image
        region, flip, short = sizes, None, self.scales[0].expand(B)
        if self.train:
            u = torch.rand(B, 8, generator=generator, dtype=torch.float64)
            pick = lambda values, r: values[(r * len(values)).long().clamp(max=len(values) - 1)]  # noqa: E731
            flip, cut, short = u[:, 0] < 0.5, u[:, 1] < 0.5, pick(self.scales, u[:, 2])
            h1, w1 = resized_size(H, W, pick(self.crop_scales, u[:, 3]))      # the crop branch's first resize
            lo, hi = self.crop_sides
            hc = lo + (u[:, 4] * (h1.clamp(max=hi).clamp(min=lo) - lo + 1)).floor()   # randint(lo, min(h1, hi))
            wc = lo + (u[:, 5] * (w1.clamp(max=hi).clamp(min=lo) - lo + 1)).floor()
            hc, wc = torch.minimum(hc, h1), torch.minimum(wc, w1)
            top, left = (u[:, 6] * (h1 - hc + 1)).floor(), (u[:, 7] * (w1 - wc + 1)).floor()
            box = torch.stack([left * W / w1, top * H / h1, wc * W / w1, hc * H / h1], 1)
            crops = torch.where(cut[:, None], box, crops)
            region = torch.where(cut[:, None], torch.stack([hc, wc], 1), sizes)
        out = torch.stack(resized_size(*region.unbind(1), short, self.max_size), 1).clamp(min=self.min_side)
        x = resized_crops(images, crops.float(), out.long(), flip, clip="box")
        moved, keep = move_boxes(boxes, crops, out, flip) if boxes is not None else (None, None)
        return x, out.long(), moved, keep


def train_transform(kind: str, *, size: int, scale: tuple[float, float] | None = None,
                    erase: float = 0.0, colour: float = 0.0) -> Transform:
    """Training augmentation, output ``size``², batched (:func:`crop_boxes`, :func:`resized_crops`).
    ``"crop"``: RandomResizedCrop(scale (0.08, 1)) + horizontal flip (pre-training, Table 12; linear probing,
    Table 13). ``"randaug"``: that + RandAugment(9, 0.5) (tran-1 probing, Table 13; fine-tuning, Table 14) +
    RandomErasing with probability ``erase`` (0.25 for MF-W2880, Table 14). RandAug(9, 0.5) is timm's
    rand-m9-mstd0.5: 2 operations at magnitude 9/10, i.e. kornia's ``RandAugment(n=2, m=27)`` (kornia has no
    magnitude noise), drawn per image. ``"detect"``: DETR's (:class:`DetrResize`), boxes with the images.
    ``colour`` > 0 (not in the paper; ``--colour-jitter``) adds :class:`ColourJitter` after the crop, per image:
    brightness, contrast and saturation factors in [1 - colour, 1 + colour], hue shifts up to colour / 4 turns."""
    if kind == "detect":
        return DetrResize(size=size, train=True)
    if kind in ("crop", "randaug"):
        return Crops(size=size, mode="random", scale=scale or (0.08, 1.0), randaug=kind == "randaug",
                     erase=erase if kind == "randaug" else 0.0, colour=colour)
    raise ValueError(f"kind={kind!r}: expected 'crop', 'randaug' or 'detect'")


def eval_transform(kind: str = "classify", *, size: int, crop_ratio: float = 0.875) -> Transform:
    """Evaluation, batched: ``"classify"`` resizes the shorter side to ``size / crop_ratio`` (antialiased) and
    centre-crops ``size``² (``crop_ratio=1`` keeps a square input whole, e.g. ``photos`` validation crops);
    ``"detect"`` resizes the shorter side to ``size``, the longer to at most 1333 · size / 800 (DETR's)."""
    if kind == "classify":
        return Crops(size=size, mode="centre", crop_ratio=crop_ratio)
    if kind == "detect":
        return DetrResize(size=size, train=False)
    raise ValueError(f"kind={kind!r}: expected 'classify' or 'detect'")
