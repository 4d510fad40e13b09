"""augment.py: the batched crops and resizes against torch's interpolate and RandomResizedCrop's statistics,
RandAugment's per-image draws, DETR's resizes and the boxes they move, the colour jitter."""
import math

import kornia
import pytest
import torch
import torch.nn.functional as F

import augment

# --- the batched training pipeline: decode once, crop and resize whole batches ----------------------------------

def _coordinates(h: int = 192, w: int = 256) -> augment.Decoded:
    """Red = the pixel's column, green = its row (exact in uint8 for w <= 256): a crop's box reads back."""
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return augment.Decoded(torch.stack([xx, yy, torch.zeros_like(xx)]).to(torch.uint8))


def _read_back(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(w, h, flipped) of the boxes that made crops ``x`` of a coordinate image: the slope of the coordinates
    between the second and second-last output pixels (their filters never reach the crop's edge)."""
    s = x.shape[-1]
    cols, rows = 255 * x[:, 0].mean(1), 255 * x[:, 1].mean(2)
    dx, dy = (cols[:, -2] - cols[:, 1]) / (s - 3), (rows[:, -2] - rows[:, 1]) / (s - 3)
    return dx.abs() * s, dy * s, dx < 0


def test_batched_crops_have_random_resized_crop_statistics():
    """4000 batched crops of a coordinate image: the boxes read back from the pixels are the ones the batched
    sampler drew, and their area fraction, aspect ratio, position and flip statistics match kornia's per-image
    RandomResizedCrop + RandomHorizontalFlip (what each image drew before) within sampling tolerance."""
    import kornia.augmentation as K

    n, size, (H, W) = 4000, 32, (192, 256)
    image, transform = _coordinates(H, W), augment.train_transform("crop", size=size)
    x = torch.cat([transform.batch([image] * 500, generator=torch.Generator().manual_seed(i)) for i in range(8)])
    drawn, flips = [], []
    for i in range(8):  # the same draws again: the transform takes its boxes, then its flips, from the generator
        g = torch.Generator().manual_seed(i)
        drawn.append(augment.crop_boxes(torch.tensor([[H, W]] * 500), generator=g))
        flips.append(torch.rand(500, generator=g) < 0.5)
    drawn, flips = torch.cat(drawn), torch.cat(flips)
    w, h, flipped = _read_back(x)
    assert torch.equal(flipped, flips)
    assert (w - drawn[:, 2]).abs().max() < 1.5 and (h - drawn[:, 3]).abs().max() < 1.5  # pixels

    shape = torch.Size([n, 3, H, W])
    torch.manual_seed(0)
    src = K.RandomResizedCrop((size, size), scale=(0.08, 1.0)).forward_parameters(shape)["src"]
    ref = torch.stack([src[:, 0, 0], src[:, 0, 1], src[:, 2, 0] - src[:, 0, 0] + 1, src[:, 2, 1] - src[:, 0, 1] + 1], 1)
    ref_flip = K.RandomHorizontalFlip().forward_parameters(shape)["batch_prob"].bool()

    def stats(boxes):
        x0, y0, bw, bh = boxes.double().T
        return {"area": bw * bh / (W * H), "log_aspect": (bw / bh).log(), "cx": (x0 + bw / 2) / W,
                "cy": (y0 + bh / 2) / H}

    ours, theirs = stats(drawn), stats(ref)
    q = torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)
    for key in ours:
        a, b = ours[key], theirs[key]
        assert abs(a.mean() - b.mean()) < 0.015, key
        assert (a.quantile(q) - b.quantile(q)).abs().max() < 0.025, key
        grid = torch.cat([a, b]).sort().values  # two-sample Kolmogorov-Smirnov statistic
        ks = ((a[None] <= grid[:, None]).double().mean(1) - (b[None] <= grid[:, None]).double().mean(1)).abs().max()
        assert ks < 0.045, (key, float(ks))  # the 0.1% critical value for 4000 against 4000 is 0.044
    assert abs(flips.double().mean() - 0.5) < 0.03 and abs(ref_flip.double().mean() - 0.5) < 0.03
    assert (drawn[:, 2:] <= torch.tensor([W, H])).all() and (drawn[:, :2] >= 0).all()
    assert (drawn[:, :2] + drawn[:, 2:] <= torch.tensor([W, H])).all()


def test_crop_boxes_fall_back_to_the_centre_crop():
    """No try fits an image far outside the ratio range: torchvision's fallback, the largest centred box."""
    boxes = augment.crop_boxes(torch.tensor([[10, 400], [400, 10], [100, 100]]), scale=(1.0, 1.0),
                            ratio=(0.9, 1.1), generator=torch.Generator().manual_seed(0))
    assert boxes[0].tolist() == [194, 0, 11, 10] and boxes[1].tolist() == [0, 194, 10, 11]  # ratio 1.1 / 0.9
    assert boxes[2].tolist() == [0, 0, 100, 100]


def _smooth(h: int, w: int) -> augment.Decoded:
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                            indexing="ij")
    rgb = [128 + 100 * torch.sin(xx / 23 + yy / 31), 128 + 100 * torch.cos(xx / 17 - yy / 29),
           128 + 80 * torch.sin((xx + yy) / 40)]
    return augment.Decoded(torch.stack(rgb).round().clamp(0, 255).to(torch.uint8))


def test_batched_crop_and_resize_equals_interpolate_of_the_crop():
    """Each box cut from the image and resized by F.interpolate(antialias=True), one at a time: the batched path
    is that exactly below a 2x downscale (and for upscales), and within 0.03 where it reads the pyramid."""

    image = _smooth(180, 260)
    boxes = torch.tensor([[10, 20, 50, 40], [100, 50, 33, 61], [3, 3, 16, 16], [7, 9, 12, 30],  # level 0
                          [0, 0, 260, 180], [5, 7, 200, 150], [60, 2, 130, 170]])               # pyramid
    flip = torch.tensor([False, True, False, True, False, True, False])
    out = augment.resized_crops([image] * len(boxes), boxes.float(), 32, flip)
    assert out.shape == (7, 3, 32, 32) and out.dtype == torch.float32
    for i, (x0, y0, w, h) in enumerate(boxes.tolist()):
        ref = F.interpolate(image.pixels[None, :, y0:y0 + h, x0:x0 + w].float() / 255, size=(32, 32),
                            mode="bilinear", antialias=True, align_corners=False)[0]
        ref = ref.flip(-1) if flip[i] else ref
        error = (out[i] - ref).abs()
        if max(w, h) < 64:
            assert error.max() < 1e-5, i
        else:
            assert error.max() < 0.03 and error.mean() < 0.005, i
    assert torch.equal(image.level(2), F.avg_pool2d(image.pixels[None].float(), 4)[0].round().to(torch.uint8))
    sizes = torch.tensor([[32, 20], [17, 40], [40, 40], [9, 33], [24, 34], [32, 48], [48, 32]])  # (h, w) each
    padded = augment.resized_crops([image] * len(boxes), boxes.float(), sizes, flip)
    assert padded.shape == (7, 3, 48, 48)
    for i, (x0, y0, w, h) in enumerate(boxes.tolist()):
        out_h, out_w = sizes[i].tolist()
        ref = F.interpolate(image.pixels[None, :, y0:y0 + h, x0:x0 + w].float() / 255, size=(out_h, out_w),
                            mode="bilinear", antialias=True, align_corners=False)[0]
        ref = ref.flip(-1) if flip[i] else ref
        error = (padded[i, :, :out_h, :out_w] - ref).abs()
        if max(w / out_w, h / out_h) < 2:
            assert error.max() < 1e-5, i
        else:
            assert error.max() < 0.03 and error.mean() < 0.005, i
        assert padded[i, :, out_h:].abs().sum() == 0 and padded[i, :, :, out_w:].abs().sum() == 0, "zero padding"
    grey = augment.Decoded(image.pixels[:1].clone())  # a grey image is its one channel three times
    assert torch.equal(augment.resized_crops([grey], boxes[:1].float(), 32)[0],
                       augment.resized_crops([augment.Decoded(grey.rgb().contiguous())], boxes[:1].float(), 32)[0])


def test_centre_crop_equals_resize_then_crop():
    """eval_transform("classify") is F.interpolate(antialias=True) of the shorter side to size / crop_ratio, then
    torchvision's centre crop: exactly below a 2x downscale, within 0.03 through the pyramid."""

    size, ratio = 32, 0.875
    short = round(size / ratio)
    for (h, w), tolerance in (((60, 80), 1e-5), ((80, 60), 1e-5), ((150, 200), 0.03)):
        image = _smooth(h, w)
        out = augment.eval_transform("classify", size=size, crop_ratio=ratio).batch([image])[0]
        resized = (short, int(short * w / h)) if h <= w else (int(short * h / w), short)
        full = F.interpolate(image.pixels[None].float() / 255, size=resized, mode="bilinear", antialias=True,
                             align_corners=False)[0]
        top, left = round((resized[0] - size) / 2), round((resized[1] - size) / 2)
        assert (out - full[:, top:top + size, left:left + size]).abs().max() < tolerance, (h, w)
    square = _smooth(32, 32)  # crop_ratio 1 keeps an image of the output size (to float rounding)
    same = augment.eval_transform(size=32, crop_ratio=1.0).batch([square])[0]
    assert (same - square.pixels.float() / 255).abs().max() < 1e-6


def test_randaugment_draws_two_operations_per_image():
    """kornia's RandAugment draws one pair of operations for a whole batch; ours, one pair per image (timm's)."""
    randaug = augment._RandAugment(n=2, m=27)
    got = {i: [] for i in range(64)}

    def op(k):
        def apply(x):
            for image in x[:, 0, 0, 0].long().tolist():
                got[image].append(k)
            return x
        return apply

    randaug.ops = [op(k) for k in range(len(randaug.ops))]
    randaug(torch.arange(64.0)[:, None, None, None].expand(64, 3, 4, 4).clone(), torch.Generator().manual_seed(0))
    assert all(len(ops) == 2 and ops[0] != ops[1] for ops in got.values())
    assert len({tuple(ops) for ops in got.values()}) > 20  # of 15 x 14 ordered pairs


def test_detr_resize_sizes_follow_detrs_rule():
    """Evaluation: shorter side 800, longer at most 1333 (DETR's get_size). Training at the small preset's 64: the
    shorter side one of DETR's 11 scales x 64 / 800 unless the longer side would pass round(1333 x 64 / 800) = 107,
    the aspect ratio of the whole image or of a crop kept, both branches drawn."""
    def sizes_of(transform, image, n, seed=0):
        x, sizes, _, _ = transform.batch([image] * n, generator=torch.Generator().manual_seed(seed))
        assert x.shape[2:] == tuple(sizes.amax(0).tolist())
        return sizes

    tall = augment.Decoded(torch.zeros(3, 600, 400, dtype=torch.uint8))
    wide = augment.Decoded(torch.zeros(3, 300, 900, dtype=torch.uint8))
    assert sizes_of(augment.eval_transform("detect", size=800), tall, 1).tolist() == [[1200, 800]]
    assert sizes_of(augment.eval_transform("detect", size=800), wide, 1).tolist() == [[444, 1332]]  # 444 = round(1333 / 3)
    transform = augment.train_transform("detect", size=64)
    assert transform.scales.tolist() == [38, 41, 44, 46, 49, 51, 54, 56, 59, 61, 64] and transform.max_size == 107
    sizes = sizes_of(transform, tall, 200).double()
    short, long = sizes.amin(1), sizes.amax(1)
    assert set(short.tolist()) <= set(transform.scales.tolist()) and (long <= 107).all()
    whole = (sizes[:, 0] == (sizes[:, 1] * 1.5).floor())
    assert 40 < int(whole.sum()) < 160, "about half of the images keep the whole image's ratio; the rest are crops"
    wide_sizes = sizes_of(transform, wide, 50).double()
    # capped: shorter side round(107 / 3) = 36, longer ⌊36 · 3⌋ = 108 (DETR's rounding can pass max_size by a pixel)
    assert (wide_sizes.amax(1) <= 108).all() and (wide_sizes.amin(1) >= 32).all()
    assert wide_sizes.tolist().count([36, 108]) > 10


def test_detr_resize_moves_boxes_like_its_image():
    """One box drawn as a white square: whatever DETR's draw did to the image (resize, crop, flip), the moved box
    frames the white pixels, and a box cut away by the crop is dropped (keep False)."""
    pixels = torch.zeros(3, 60, 90, dtype=torch.uint8)
    pixels[:, 10:40, 5:35] = 255
    boxes = torch.tensor([[5.0, 10, 35, 40], [89, 59, 90, 60]])  # the square; a 1 px box in the far corner
    x, sizes, moved, keep = augment.train_transform("detect", size=64).batch(
        [augment.Decoded(pixels)] * 32, boxes=[boxes] * 32, generator=torch.Generator().manual_seed(3))
    for image, (h, w), b, k in zip(x, sizes.tolist(), moved, keep):
        white = (image.mean(0) > 0.5).nonzero()
        if k[0]:
            x0, y0, x1, y1 = b[0].tolist()
            assert white[:, 1].min() >= math.floor(x0) and white[:, 1].max() <= math.ceil(x1) - 1
            assert white[:, 0].min() >= math.floor(y0) and white[:, 0].max() <= math.ceil(y1) - 1
        assert (b[:, 2] <= w + 1e-4).all() and (b[:, 3] <= h + 1e-4).all()
    assert not all(k[1] for k in keep), "some crops cut the corner box away"


def test_colour_jitter_is_per_image_reproducible_and_off_by_default():
    image = augment.Decoded(torch.full((3, 40, 40), 128, dtype=torch.uint8))  # one flat grey-ish image, 64 times

    def draw(colour, seed):
        return augment.train_transform("crop", size=16, colour=colour).batch([image] * 64,
                                                                             torch.Generator().manual_seed(seed))

    plain, jittered = draw(0.0, 1), draw(0.3, 1)
    assert torch.allclose(plain, torch.full_like(plain, 128 / 255), atol=1e-6), "no jitter: the flat image stays flat"
    means = jittered.mean((2, 3))
    assert means.std(0).min() > 0.02, "every image draws its own brightness / contrast / saturation"
    assert jittered.min() >= 0 and jittered.max() <= 1
    assert torch.equal(jittered, draw(0.3, 1)) and not torch.equal(jittered, draw(0.3, 2)), "seeded, reproducible"


def _colour_cases() -> torch.Tensor:
    """Random pixels plus the edge cases of HSV: black, white, grey, ties between channels, pure primaries."""
    x = torch.rand(48, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    x[0], x[1], x[2] = 0.0, 1.0, x[2, :1]
    x[3, 1] = x[3, 0]
    x[4, 2] = x[4, 0]
    x[5] = torch.eye(3)[:, :, None].expand(3, 3, 2).reshape(3, 6, 1).expand(3, 6, 6)
    return x


@pytest.mark.parametrize("step, reference, lo, hi", [
    ("brightness", lambda x, f: kornia.enhance.adjust_brightness(x, f - 1), 0.0, 2.0),
    ("contrast", kornia.enhance.adjust_contrast, 0.0, 2.0),
    ("saturation", kornia.enhance.adjust_saturation, 0.0, 3.0),
    ("hue", lambda x, f: kornia.enhance.adjust_hue(x, 2 * math.pi * f), -0.5, 0.5),
])
def test_colour_steps_match_kornia(step, reference, lo, hi):
    x = _colour_cases()
    f = torch.linspace(lo, hi, len(x))
    torch.testing.assert_close(getattr(augment, step)(x, f.view(-1, 1, 1, 1)), reference(x, f), atol=2e-6, rtol=0)


def test_colour_jitter_is_kornias_colorjiggle_in_the_drawn_order():
    x = _colour_cases()
    jitter = augment.ColourJitter(0.3)
    factors, order = jitter.draw(len(x), torch.Generator().manual_seed(5))
    expected = x
    for i in order:  # kornia's four steps, one after another, with the same factors
        f = factors[:, i]
        expected = [lambda y: kornia.enhance.adjust_brightness(y, f - 1), lambda y: kornia.enhance.adjust_contrast(y, f),
                    lambda y: kornia.enhance.adjust_saturation(y, f),
                    lambda y: kornia.enhance.adjust_hue(y, 2 * math.pi * f)][i](expected)
    torch.testing.assert_close(jitter(x, torch.Generator().manual_seed(5)), expected, atol=4e-6, rtol=0)
    many = [jitter.draw(2000, torch.Generator().manual_seed(s)) for s in range(40)]
    f = torch.cat([m[0] for m in many])
    assert (f[:, :3].amin(0) >= 0.7).all() and (f[:, :3].amax(0) <= 1.3).all() and f[:, 3].abs().max() <= 0.075
    assert (f[:, :3].amin(0) < 0.701).all() and f[:, 3].abs().max() > 0.0749, "the whole range is drawn"
    assert len({tuple(m[1]) for m in many}) > 10, "the order is drawn too"


@pytest.mark.parametrize("strength", [0.0, -0.1, 1.5])
def test_colour_jitter_strength_is_checked(strength):
    with pytest.raises(ValueError, match="colour"):
        augment.ColourJitter(strength)
