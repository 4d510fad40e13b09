"""Data (data.py): local folders and COCO json with bad data, the embedded sources, sharding over simulated ranks,
box-aware transforms, and the hub offline."""
import json
import math
import time
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

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
    data.BAD.reset()
    batches = list(data.loader(ds, batch_size=8, transform=data.eval_transform(size=16)))
    assert batches[0]["images"].shape == (4, 3, 16, 16) and batches[0]["images"].dtype == torch.float32
    assert 0 <= batches[0]["images"].min() and batches[0]["images"].max() <= 1
    assert sorted(batches[0]["labels"].tolist()) == [0, 0, 1, 1]
    assert data.BAD.total() == 1 and "bad.jpg" in data.BAD.report()


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
    assert row["objects"] == {"bbox": [[5, 5, 10, 10], [45, 30, 5, 10]], "category_id": [1, 3]}
    gt = data.coco(ds)
    assert gt.loadCats(gt.getCatIds()) == [{"id": 1, "name": "cat"}, {"id": 3, "name": "dog"}]
    assert gt.imgs[9] == {"id": 9, "width": 50, "height": 40} and len(gt.anns) == 2


def test_unknown_source_lists_the_accepted_forms():
    with pytest.raises(ValueError, match="accepted sources: 'hf:NAME'.*embedded name"):
        data.load("no/such/thing")


def test_hub_offline_fails_fast():
    start = time.perf_counter()
    with pytest.raises(ConnectionError, match="hf:ILSVRC/imagenet-1k.*unreachable"):
        data.load("hf:ILSVRC/imagenet-1k", streaming=True)
    assert time.perf_counter() - start < 5


def test_photos_splits_share_no_photo_and_validation_is_fixed():
    train, val = data.load("photos", crops_per_photo=3), data.load("photos", split="validation", size=32)
    assert len(train) == 3 * len(embedded.PHOTOS["train"]) and min(train[0]["image"].size) == embedded.PHOTO_SIDE
    assert len(val) == 64 * len(embedded.PHOTOS["validation"]) and val[5]["image"].size == (32, 32)
    train_names, val_names = set(data.categories(train).values()), set(data.categories(val).values())
    assert len(train_names) == 7 and len(val_names) == 2 and not train_names & val_names
    fresh = list(embedded._photo_rows("validation", 32, 64))  # regenerated, not read from the cache
    assert np.array_equal(np.asarray(fresh[5]["image"]), np.asarray(val[5]["image"]))
    train_pixels = {np.asarray(im).tobytes() for im in train.select(range(0, len(train), 3))["image"]}
    assert len(train_pixels) == 7  # seven different photos


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
    batch = next(iter(data.loader(ds, batch_size=8)))
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
            dl = data.loader(ds, batch_size=4, shuffle=True, seed=5, rank=rank, world_size=2)
            dl.set_epoch(epoch)
            seen += [label for b in dl for label in b["labels"].tolist()]
        assert sorted(seen) == list(range(23))
        epochs.append(seen)
    assert epochs[0] != epochs[1]  # reshuffled per epoch


def test_two_simulated_ranks_on_a_stream():
    stream = _indexed(23).to_iterable_dataset(num_shards=4)
    seen = [label for rank in (0, 1)
            for b in data.loader(stream, batch_size=4, shuffle=True, rank=rank, world_size=2, buffer_size=8)
            for label in b["labels"].tolist()]
    assert sorted(seen) == list(range(23))


def test_augmentations_repeat_with_the_seed_whatever_the_workers():
    ds, transform = data.load("photos", crops_per_photo=2), data.train_transform("randaug", size=24, erase=0.25)
    runs = [torch.cat([b["images"] for b in data.loader(ds, batch_size=4, transform=transform, shuffle=True,
                                                         seed=7, num_workers=w)]) for w in (0, 2)]
    assert runs[0].shape == (14, 3, 24, 24) and torch.equal(runs[0], runs[1])


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


@pytest.mark.parametrize("transform", [data.train_transform("detect", size=32), data.eval_transform("detect", size=32)])
def test_boxes_stay_inside_the_image_and_on_their_objects(transform):
    for batch in data.loader(_squares(12), batch_size=6, transform=transform, shuffle=True, seed=1):
        for image, target in zip(batch["images"], batch["targets"]):
            cx, cy, w, h = target["boxes"].T
            assert ((cx - w / 2) >= 0).all() and ((cx + w / 2) <= 1 + 1e-6).all() and ((cy + h / 2) <= 1 + 1e-6).all()
            white = image.mean(0) > 0.5
            covered = torch.zeros_like(white)
            for bx, by, bw, bh in (target["boxes"] * 32).tolist():
                x0, y0 = math.ceil(bx - bw / 2), math.ceil(by - bh / 2)  # whole pixels inside the box
                x1, y1 = math.floor(bx + bw / 2), math.floor(by + bh / 2)
                assert white[y0:y1, x0:x1].float().mean() > 0.8  # the box frames its square
                covered[max(y0 - 1, 0):y1 + 1, max(x0 - 1, 0):x1 + 1] = True
            assert not (white & ~covered).any()  # and every visible square keeps its box
            assert target["orig_size"] == (60, 90)
