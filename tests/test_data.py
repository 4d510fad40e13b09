"""Data (data.py): local folders and COCO json with bad data, the embedded sources, sharding over simulated ranks,
box-aware transforms, and the hub offline."""
import io
import json
import math
import time
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

import augment
import data
import embedded


def _save(path: Path, array: np.ndarray, mode: str = "RGB", **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).convert(mode).save(path, **kw)


def _noise(seed: int, h: int = 20, w: int = 30) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_class_folders_grey_cmyk_and_a_corrupt_jpeg(tmp_path):
    _save(tmp_path / "zebra" / "0.png", _noise(0))
    _save(tmp_path / "zebra" / "1.jpg", _noise(1), mode="CMYK")
    _save(tmp_path / "ant" / "0.png", _noise(2), mode="L")
    good = tmp_path / "ant" / "1.jpg"
    _save(good, _noise(3))
    (tmp_path / "ant" / "bad.jpg").write_bytes(good.read_bytes()[:200])  # truncated JPEG
    ds = data.load(str(tmp_path))
    assert data.categories(ds) == {0: "ant", 1: "zebra"}  # sorted folder names
    assert sorted(ds["label"]) == [0, 0, 0, 1, 1]
    dl = data.Loader(ds, batch_size=8, transform=augment.eval_transform(size=16))
    batches = list(dl)
    assert batches[0]["images"].shape == (4, 3, 16, 16) and batches[0]["images"].dtype == torch.float32
    assert 0 <= batches[0]["images"].min() and batches[0]["images"].max() <= 1
    assert sorted(batches[0]["labels"].tolist()) == [0, 0, 1, 1]
    assert dl.bad.total() == 1 and "bad.jpg" in dl.bad.summary()


def test_unlabelled_folder_and_split_subfolders(tmp_path):
    for i in range(3):
        _save(tmp_path / "plain" / f"{i}.png", _noise(i))
    assert data.load(str(tmp_path / "plain")).column_names == ["image"]
    _save(tmp_path / "tree" / "train" / "cat" / "0.png", _noise(0))
    _save(tmp_path / "tree" / "val" / "dog" / "0.png", _noise(1))
    assert data.categories(data.load(str(tmp_path / "tree"), split="validation")) == {0: "dog"}


def test_coco_json_is_cleaned_with_a_warning(tmp_path):
    _save(tmp_path / "val2017" / "a.png", _noise(0, 40, 50))
    ann = [([5, 5, 10, 10], 1), ([60, 5, 10, 10], 1), ([5, 5, 0, 8], 1), ([5, 5, 10, 10], 7), ([45, 30, 10, 20], 3)]
    coco = {"images": [{"id": 9, "file_name": "a.png", "width": 50, "height": 40}],
            "categories": [{"id": 1, "name": "cat"}, {"id": 3, "name": "dog"}],
            "annotations": [{"id": i, "image_id": 9, "bbox": b, "category_id": c, "iscrowd": 0}
                            for i, (b, c) in enumerate(ann)]}
    (tmp_path / "annotations").mkdir()
    path = tmp_path / "annotations" / "instances_val2017.json"
    path.write_text(json.dumps(coco))
    with pytest.warns(UserWarning, match="clipped to the image: 1, outside the image: 1, "
                                         "unknown category or image id: 1, zero-area: 1"):
        ds = data.load(str(path))
    row = ds[0]
    assert row["image_id"] == 9 and row["image"].size == (50, 40)
    assert row["objects"] == {"bbox": [[5, 5, 10, 10], [45, 30, 5, 10]], "category_id": [1, 3], "area": [100, 50],
                              "iscrowd": [False, False]}
    gt = data.coco(ds)
    assert gt.loadCats(gt.getCatIds()) == [{"id": 1, "name": "cat"}, {"id": 3, "name": "dog"}]
    assert gt.imgs[9] == {"id": 9, "width": 50, "height": 40} and len(gt.anns) == 2


def test_coco_crowd_regions_are_ignored_at_evaluation_and_left_out_of_training(tmp_path):
    """COCO's iscrowd annotations: kept as ignore regions for COCOeval (a detection on a crowd is no false positive)
    and not training targets; each object keeps the json's area (COCO's mask area, which sets APs/APm/APl)."""
    import contextlib

    from pycocotools.cocoeval import COCOeval
    _save(tmp_path / "val2017" / "a.png", _noise(0, 40, 50))
    anns = [{"id": 1, "image_id": 9, "bbox": [5, 5, 10, 10], "category_id": 1, "iscrowd": 0, "area": 70.5},
            {"id": 2, "image_id": 9, "bbox": [30, 10, 15, 20], "category_id": 1, "iscrowd": 1, "area": 250.0}]
    coco = {"images": [{"id": 9, "file_name": "a.png", "width": 50, "height": 40}],
            "categories": [{"id": 1, "name": "cat"}], "annotations": anns}
    (tmp_path / "annotations").mkdir()
    path = tmp_path / "annotations" / "instances_val2017.json"
    path.write_text(json.dumps(coco))
    ds = data.load(str(path))
    assert ds[0]["objects"]["iscrowd"] == [False, True] and ds[0]["objects"]["area"] == [70.5, 250.0]

    gt = data.coco(ds)
    assert sorted((a["iscrowd"], a["area"]) for a in gt.anns.values()) == [(0, 70.5), (1, 250.0)]
    # the object found first, then a detection on the crowd region: a perfect AP only if the crowd is ignored
    dets = gt.loadRes([{"image_id": 9, "category_id": 1, "bbox": [5, 5, 10, 10], "score": 0.9},
                       {"image_id": 9, "category_id": 1, "bbox": [30, 10, 15, 20], "score": 0.95}])
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(gt, dets, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    assert ev.stats[1] == pytest.approx(1.0), "AP50: the crowd detection is not a false positive"

    batch = next(iter(data.Loader(ds, batch_size=1, transform=augment.eval_transform("detect", size=64))))
    assert batch["targets"][0]["labels"].tolist() == [1], "the crowd region is no training target"


def test_unknown_source_lists_the_accepted_forms():
    with pytest.raises(ValueError, match="accepted sources: 'hf:NAME'.*embedded name"):
        data.load("no/such/thing")


def test_hub_offline_fails_fast():
    start = time.perf_counter()
    with pytest.raises(ConnectionError, match="hf:ILSVRC/imagenet-1k.*unreachable"):
        data.load("hf:ILSVRC/imagenet-1k", streaming=True)
    assert time.perf_counter() - start < 5


@pytest.mark.parametrize("with_wallpapers", [False, pytest.param(True, marks=pytest.mark.slow)])  # 42 big images
def test_photos_splits_share_no_photo_and_validation_is_fixed(with_wallpapers):
    train = data.load("photos", crops_per_photo=3, with_wallpapers=with_wallpapers)
    val = data.load("photos", split="validation", size=32)
    n = len(embedded.PHOTOS["train"]) + len(embedded.wallpapers() if with_wallpapers else [])
    assert len(train) == 3 * n and min(train[0]["image"].size) == embedded.PHOTO_SIDE
    assert len(val) == 64 * len(embedded.PHOTOS["validation"]) and val[5]["image"].size == (32, 32)
    train_names, val_names = set(data.categories(train).values()), set(data.categories(val).values())
    assert len(train_names) == n and len(val_names) == 2 and not train_names & val_names
    fresh = list(embedded._photo_rows("validation", 32, 64))  # regenerated, not read from the cache
    assert np.array_equal(np.asarray(fresh[5]["image"]), np.asarray(val[5]["image"]))
    train_pixels = {np.asarray(im).tobytes() for im in train.select(range(0, len(train), 3))["image"]}
    assert len(train_pixels) == n  # n different photos


def test_photos_without_wallpapers_is_the_seven_scikit_image_photos():
    train = data.load("photos", crops_per_photo=1, with_wallpapers=False)
    assert list(data.categories(train).values()) == [name.split(".")[0] for name in embedded.PHOTOS["train"]]


def test_shapes_are_deterministic_with_exact_boxes():
    ds = data.load("shapes", split="validation", n=40, size=48, seed=3)
    assert ds.column_names == ["image", "image_id", "objects"] and len(ds) == 40
    assert data.categories(ds) == dict(enumerate(embedded.SHAPES))
    again = list(embedded._shape_rows("validation", 40, 48, 3, "texture", 3))
    assert again[7]["objects"] == ds[7]["objects"]
    for row in ds.select(range(10)):
        image = np.asarray(row["image"]).astype(int)
        for (x, y, w, h) in row["objects"]["bbox"]:
            assert 0 <= x < x + w <= 48 and 0 <= y < y + h <= 48
            inside = image[int(y):int(y + h), int(x):int(x + w)]
            colours = {tuple(c) for c in embedded.PALETTE.astype(int) * 255}
            on_edges = [inside[0], inside[-1], inside[:, 0], inside[:, -1]]  # the shape touches all four sides
            assert all(any(tuple(p) in colours for p in edge) for edge in on_edges)


def test_trees_tiles_and_boxes():
    train, val = data.load("trees", size=400), data.load("trees", split="validation", size=400)
    assert (len(train), len(val)) == (43, 13) and train[0]["image"].size == (400, 400)
    n_train, n_val = (sum(len(o["bbox"]) for o in ds["objects"]) for ds in (train, val))
    assert 600 < n_train <= 635 and 290 < n_val <= 316  # 951 crowns; some are cut by tile borders
    assert data.categories(train) == {0: "tree"}
    boxes = np.concatenate([np.array(o["bbox"]).reshape(-1, 4) for o in val["objects"]])
    assert (boxes[:, :2] >= 0).all() and (boxes[:, :2] + boxes[:, 2:] <= 400).all() and (boxes[:, 2:] > 0).all()
    gt = data.coco(val)
    assert len(gt.anns) == n_val
    from pycocotools.cocoeval import COCOeval
    perfect = gt.loadRes([{**a, "score": 1.0} for a in gt.anns.values()])
    evaluation = COCOeval(gt, perfect, "bbox")
    evaluation.evaluate(), evaluation.accumulate(), evaluation.summarize()
    assert evaluation.stats[0] == pytest.approx(1.0)  # COCOeval accepts the ground truth as is


def _fashion_or_skip():
    if not (embedded.FASHION_DIR / "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip("Debian's dataset-fashion-mnist is not installed (apt-get install dataset-fashion-mnist; CI does)")


def test_fashion_mnist_test_split():
    _fashion_or_skip()
    ds = data.load("fashion-mnist", split="test")
    assert len(ds) == 10_000 and ds[0]["image"].size == (28, 28) and len(data.categories(ds)) == 10
    batch = next(iter(data.Loader(ds, batch_size=8)))
    assert batch["images"].shape == (8, 3, 28, 28)  # grey becomes RGB


@pytest.mark.slow
def test_fashion_mnist_train_split():
    _fashion_or_skip()
    ds = data.load("fashion-mnist")
    assert len(ds) == 60_000 and np.bincount(ds["label"]).tolist() == [6000] * 10


@pytest.mark.parametrize("n,batch_size,world_size", [(23, 4, 2), (24, 4, 2), (9, 4, 2), (17, 3, 3), (5, 1, 2)])
def test_rank_batches_cover_every_sample_once(n, batch_size, world_size):
    plans = [data.rank_batches(n, batch_size=batch_size, rank=r, world_size=world_size, shuffle=True, seed=1,
                               epoch=2) for r in range(world_size)]
    seen = [i for plan in plans for b in plan for i in b]
    assert sorted(seen) == list(range(n))
    assert all(0 < len(b) <= batch_size for plan in plans for b in plan)
    if batch_size > 1:
        assert len({len(plan) for plan in plans}) == 1  # same number of steps on every rank


def _indexed(n: int) -> datasets.Dataset:
    images = [Image.fromarray(np.full((8, 8, 3), i, np.uint8)) for i in range(n)]
    return datasets.Dataset.from_dict({"image": images, "label": list(range(n))})


def test_two_simulated_ranks_see_every_sample_once():
    ds = _indexed(23)
    epochs = []
    for epoch in (0, 1):
        seen = []
        for rank in (0, 1):
            dl = data.Loader(ds, batch_size=4, shuffle=True, seed=5, rank=rank, world_size=2)
            dl.set_epoch(epoch)
            seen += [label for b in dl for label in b["labels"].tolist()]
        assert sorted(seen) == list(range(23))
        epochs.append(seen)
    assert epochs[0] != epochs[1]  # reshuffled per epoch


def test_two_simulated_ranks_on_a_stream():
    stream = _indexed(23).to_iterable_dataset(num_shards=4)
    seen = [label for rank in (0, 1)
            for b in data.Loader(stream, batch_size=4, shuffle=True, rank=rank, world_size=2, buffer_size=8)
            for label in b["labels"].tolist()]
    assert sorted(seen) == list(range(23))


def test_augmentations_repeat_with_the_seed_whatever_the_workers():
    ds = data.load("photos", crops_per_photo=2, with_wallpapers=False)
    transform = augment.train_transform("randaug", size=24, erase=0.25)
    runs = [torch.cat([b["images"] for b in data.Loader(ds, batch_size=4, transform=transform, shuffle=True,
                                                         seed=7, num_workers=w)]) for w in (0, 2)]
    assert runs[0].shape == (len(ds), 3, 24, 24) and torch.equal(runs[0], runs[1])


def _squares(n: int) -> datasets.Dataset:
    """White squares on black at known boxes: after any box-aware transform a box must frame white pixels."""
    rng, rows = np.random.default_rng(0), []
    for i in range(n):
        image, boxes = np.zeros((60, 90, 3), np.uint8), []
        for x in (5, 50):
            y, s = int(rng.integers(0, 30)), int(rng.integers(12, 30))
            image[y:y + s, x:x + s] = 255
            boxes.append([x, y, s, s])
        rows.append({"image": Image.fromarray(image), "image_id": i,
                     "objects": {"bbox": boxes, "category_id": [0, 1]}})
    return datasets.Dataset.from_list(rows)


@pytest.mark.parametrize("transform", [augment.train_transform("detect", size=64), augment.eval_transform("detect", size=64)])
def test_boxes_stay_inside_the_image_and_on_their_objects(transform):
    """DETR's resizes, crops and flips move the boxes with the squares; each image sits top-left in a zero-padded
    batch whose mask is True exactly off it, and its boxes are normalized by its own size."""
    sizes = set()
    for batch in data.Loader(_squares(12), batch_size=6, transform=transform, shuffle=True, seed=1):
        for image, mask, target in zip(batch["images"], batch["mask"], batch["targets"]):
            h, w = int((~mask).sum(0).max()), int((~mask).sum(1).max())
            assert (~mask[:h, :w]).all() and int((~mask).sum()) == h * w, "the image is one top-left rectangle"
            assert not image[:, mask].any(), "zero padding"
            sizes.add((h, w))
            cx, cy, bw, bh = target["boxes"].T
            assert ((cx - bw / 2) >= 0).all() and ((cx + bw / 2) <= 1 + 1e-6).all()
            assert ((cy - bh / 2) >= 0).all() and ((cy + bh / 2) <= 1 + 1e-6).all()
            white = image[:, :h, :w].mean(0) > 0.5
            covered = torch.zeros_like(white)
            for bx, by, bw, bh in (target["boxes"] * torch.tensor([w, h, w, h])).tolist():
                x0, y0 = math.ceil(bx - bw / 2), math.ceil(by - bh / 2)  # whole pixels inside the box
                x1, y1 = math.floor(bx + bw / 2), math.floor(by + bh / 2)
                assert white[y0:y1, x0:x1].float().mean() > 0.8  # the box frames its square
                covered[max(y0 - 1, 0):y1 + 1, max(x0 - 1, 0):x1 + 1] = True
            # and every visible square keeps its box, but for slivers under 1 px cut by the crop's edge (dropped
            # by the 1 px rule; antialiasing can still show them in the border pixels)
            assert not (white & ~covered)[1:-1, 1:-1].any()
            assert target["orig_size"] == (60, 90) and target["size"] == (h, w)
    if isinstance(transform, augment.DetrResize) and not transform.train:
        assert sizes == {(64, 96)}, "evaluation: the shorter side to size, the aspect ratio kept"
    else:
        assert len(sizes) > 4


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
    import torch.nn.functional as F

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
    import torch.nn.functional as F

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


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _repeated(distinct: int = 5, repeats: int = 4, sizes=((20, 30), (40, 24), (33, 33))) -> datasets.Dataset:
    """``distinct`` images of a few sizes and one corrupt file, each row ``repeats`` times (an index mapping)."""
    cells = [{"bytes": _png(_noise(i, *sizes[i % len(sizes)])), "path": None} for i in range(distinct)]
    cells.append({"bytes": _png(_noise(9))[:60], "path": "bad.png"})  # truncated
    features = datasets.Features(image=datasets.Image(), label=datasets.Value("int64"))
    ds = datasets.Dataset.from_dict({"image": cells, "label": list(range(distinct + 1))}, features=features)
    return ds.select(np.repeat(np.arange(distinct + 1), repeats))


def test_the_cache_decodes_each_distinct_image_once_and_still_counts_bad_rows(monkeypatch):
    opened = []
    real_open = data._open
    monkeypatch.setattr(data, "_open", lambda cell: opened.append(1) or real_open(cell))
    ds, transform = _repeated(), augment.train_transform("crop", size=16)
    dl = data.Loader(ds, batch_size=5, transform=transform, shuffle=True, seed=3)
    for epoch in (0, 1):
        dl.set_epoch(epoch)
        labels = [label for batch in dl for label in batch["labels"].tolist()]
        assert sorted(labels) == sorted(list(range(5)) * 4)  # every good row, once
    assert len(opened) == 6 and dl.cache.decodes == 6  # 5 images + the corrupt one, read once in two epochs
    assert dl.bad.total() == 8 and "8× bad.png" in dl.bad.summary()  # its 4 rows in each of 2 epochs
    shared = data.BadImages()  # loaders may share one count
    small = data.Loader(ds, batch_size=5, transform=transform, cache_bytes=0, bad=shared)  # no room: nothing stays
    opened.clear()
    assert sum(len(b["images"]) for b in small) == 20
    assert len(opened) == 9  # in order, batches of 5 over rows 0000 1111 2222 3333 4444 5555: 2+2+2+2+1 images
    assert small.bad is shared and shared.total() == 4 and dl.bad.total() == 8


def test_the_cache_keeps_the_most_recently_used_within_its_budget():
    cache = data.ImageCache(budget=3 * (300 * 4 // 3 + 64))  # three 10x10 RGB images
    images = [augment.Decoded(torch.zeros(3, 10, 10, dtype=torch.uint8)) for i in range(4)]
    for i in range(3):
        cache.put(i, images[i])
    assert cache.get(0) is images[0]  # now the most recently used
    cache.put(3, images[3])
    assert cache.get(1) is None and all(cache.get(i) is images[i] for i in (0, 2, 3))
    assert cache.bytes <= cache.budget


def test_batches_repeat_with_the_seed_whatever_the_workers_over_epochs():
    ds, transform = _repeated(repeats=3), augment.train_transform("randaug", size=16, erase=0.5)
    runs = []
    for workers in (0, 1):
        dl = data.Loader(ds, batch_size=4, transform=transform, shuffle=True, seed=11, num_workers=workers)
        epochs = []
        for epoch in (0, 1):  # the same loader: its workers (and their caches) persist across epochs
            dl.set_epoch(epoch)
            epochs.append(torch.cat([b["images"] for b in dl]))
        runs.append(epochs)
    assert runs[0][0].shape == (15, 3, 16, 16)
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    assert not torch.equal(runs[0][0], runs[0][1])  # new draws each epoch
    dl.set_epoch(1, skip=2)  # a resumed epoch skips its first batches and draws the rest as before
    assert torch.equal(torch.cat([b["images"] for b in dl]), runs[0][1][8:])


def test_a_stream_goes_through_the_batched_transform():
    stream = _repeated(repeats=2).to_iterable_dataset(num_shards=2)
    dl = data.Loader(stream, batch_size=4, transform=augment.train_transform("crop", size=12), shuffle=True,
                     buffer_size=4)
    batches = list(dl)
    assert sum(len(b["images"]) for b in batches) == 10 and batches[0]["images"].shape[1:] == (3, 12, 12)
    assert dl.bad.total() == 2


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
        torch.manual_seed(seed)  # kornia's draws (the loader seeds each batch the same way)
        return augment.train_transform("crop", size=16, colour=colour).batch([image] * 64, torch.Generator().manual_seed(0))

    plain, jittered = draw(0.0, 1), draw(0.3, 1)
    assert torch.allclose(plain, torch.full_like(plain, 128 / 255), atol=1e-6), "no jitter: the flat image stays flat"
    means = jittered.mean((2, 3))
    assert means.std(0).min() > 0.02, "every image draws its own brightness / contrast / saturation"
    assert jittered.min() >= 0 and jittered.max() <= 1
    assert torch.equal(jittered, draw(0.3, 1)) and not torch.equal(jittered, draw(0.3, 2)), "seeded, reproducible"


def _some_unreadable(n: int, bad: set[int]) -> datasets.Dataset:
    """``n`` labelled 16² images, those at ``bad`` truncated files."""
    cells = [{"bytes": _png(_noise(i, 16, 16))[:60] if i in bad else _png(_noise(i, 16, 16)), "path": f"{i}.png"}
             for i in range(n)]
    features = datasets.Features(image=datasets.Image(), label=datasets.Value("int64"))
    return datasets.Dataset.from_dict({"image": cells, "label": list(range(n))}, features=features)


@pytest.mark.parametrize("which", [0, 1, 2], ids=["first", "middle", "last"])
def test_a_batch_of_only_unreadable_images_is_replaced_so_every_rank_takes_the_same_steps(which):
    """8 rows dealt to 2 ranks in batches of 1: 4 batches a rank. Rank 1's batch ``which`` (and with ``which`` 2 its
    batch 3 too) unreadable: dropped, rank 1 would take fewer steps than rank 0 and hang it at the gradient sync;
    with ``replace_unreadable`` a readable batch of the same rank stands in, and the count says how many."""
    plan = data.rank_batches(8, batch_size=1, rank=1, world_size=2, shuffle=True, seed=5, epoch=0)
    dead = {which, 3} if which == 2 else {which}
    ds = _some_unreadable(8, bad={plan[b][0] for b in dead})
    transform = augment.train_transform("crop", size=8)
    counts = {}
    for replace in (False, True):
        for rank in (0, 1):
            dl = data.Loader(ds, batch_size=1, transform=transform, shuffle=True, seed=5, rank=rank, world_size=2,
                             replace_unreadable=replace)
            labels = [b["labels"].tolist() for b in dl]
            counts[replace, rank] = len(labels)
            if rank == 1:
                good = [[plan[b][0]] for b in range(4) if b not in dead]
                assert [x for x in labels if x not in good] == [], "only the rank's own readable images"
                assert sorted(map(tuple, {tuple(x) for x in labels})) == sorted(map(tuple, good))
                assert dl.replaced == (len(dead) if replace else 0) and dl.bad.total() == len(dead)
    assert counts[False, 0] == 4 and counts[False, 1] == 4 - len(dead), "dropped: the ranks disagree"
    assert counts[True, 0] == counts[True, 1] == 4, "replaced: every rank yields as many batches"
