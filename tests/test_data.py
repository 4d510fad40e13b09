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


def test_columns_read_into_memory_or_from_arrow_give_the_same_batches(monkeypatch):
    ds, transform = _squares(6), augment.train_transform("detect", size=64)

    def batches():
        loader = data.Loader(ds.select([5, 0, 3, 3, 1]), batch_size=2, transform=transform, shuffle=True, seed=3)
        return [(b["images"], b["targets"]) for b in loader]

    in_memory = batches()
    monkeypatch.setattr(data, "META_IN_MEMORY", 0)  # a large source: each batch's rows sliced from the Arrow table
    from_arrow = batches()
    assert len(in_memory) == 3
    for (x, targets), (x2, targets2) in zip(in_memory, from_arrow):
        assert torch.equal(x, x2)
        assert [t["image_id"] for t in targets] == [t["image_id"] for t in targets2]
        for t, t2 in zip(targets, targets2):
            torch.testing.assert_close(t["boxes"], t2["boxes"], rtol=0, atol=0)


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
