"""Data: every source as a HuggingFace dataset, a decoded-image cache, a sharded loader.

Rows are ``{"image": PIL image, "label": int}`` (classification; unlabelled folders have no ``label``) or
``{"image": …, "objects": {"bbox": [[x, y, w, h], …], "category_id": […]}, "image_id": int}`` (detection, COCO
conventions, absolute pixels; COCO json sources add each object's ``area`` and ``iscrowd``). Class and category names live in ``ClassLabel`` features; :func:`categories` reads them.

The loader decodes each image once into a per-process cache (:class:`ImageCache`) and transforms batches whole with
``transform.batch``. The transforms (the paper's augmentations, Tables 12-14, and the evaluation resizes) live in
augment.py: every sample's RandomResizedCrop box and flip drawn at once (:func:`crop_boxes`), all crops resized in a
few batched ops (:func:`resized_crops`), detection boxes moved with them (``augment.train_transform``,
``augment.eval_transform``).
"""
from __future__ import annotations

import contextlib
import io
import itertools
import json
import math
import os
import warnings
import weakref
from collections import Counter
from pathlib import Path

import datasets
import datasets.distributed
import numpy as np
import torch
from PIL import Image

from augment import Decoded, Transform
from embedded import EMBEDDED, detection_features

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
FORMS = ("accepted sources: 'hf:NAME' (a HuggingFace hub dataset); a local path: a folder of images, a folder with "
         "one subfolder per class, a COCO instances_*.json, a saved dataset folder or a .parquet file/folder; or an "
         "embedded name: 'photos', 'fashion-mnist', 'trees', 'shapes'")


# ----------------------------------------------------------------------------------------------------------------
# Bad data: skipped, counted, reported at the end of a run
# ----------------------------------------------------------------------------------------------------------------
class BadImages:
    """Counts images that could not be decoded; ``summary()`` is what a run prints at its end. Each loader has
    one (``loader.bad``, or one shared by several loaders through ``data.Loader(..., bad=...)``)."""

    def __init__(self):
        self.skipped: Counter[str] = Counter()

    def add(self, where: str, error: Exception):
        self.skipped[f"{where} ({type(error).__name__}: {error})"] += 1

    def total(self) -> int:
        return sum(self.skipped.values())

    def summary(self) -> str:
        if not self.skipped:
            return "bad images: none"
        lines = [f"  {n}× {what}" for what, n in self.skipped.most_common(20)]
        return f"bad images: {self.total()} skipped\n" + "\n".join(lines)


def decode(cell) -> Image.Image:
    """An RGB PIL image from a dataset cell (PIL image, ``{"bytes", "path"}`` dict or path); grey, CMYK, palette
    and alpha images become RGB. Corrupt or truncated files raise (the loader counts and skips them)."""
    image = _open(cell)
    return image if image.mode == "RGB" else image.convert("RGB")


def _open(cell) -> Image.Image:
    """A dataset cell's PIL image, loaded, in its own mode; 16-bit grey (modes ``I;16*`` and ``I``, as Pillow reads
    16-bit PNG and TIFF) becomes 8-bit ``L`` by scaling (Pillow's own conversion to RGB would clip it to white)."""
    if isinstance(cell, dict):
        cell = io.BytesIO(cell["bytes"]) if cell.get("bytes") else cell["path"]
    image = cell if isinstance(cell, Image.Image) else Image.open(cell)
    image.load()
    if image.mode == "I" or image.mode.startswith("I;16"):
        wide = np.asarray(image).astype(np.float64).clip(0, 65535)
        image = Image.fromarray((wide / 257).round().astype(np.uint8))
    return image


# ----------------------------------------------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------------------------------------------
def load(source: str, *, split: str = "train", streaming: bool = False, **options):
    """A ``datasets.Dataset`` (or ``IterableDataset`` when ``streaming``) of classification or detection rows.

    ``source``: ``hf:NAME``, a local path, or an embedded name (``photos``, ``fashion-mnist``, ``trees``,
    ``shapes``); ``options`` go to the source (embedded sources' options are documented on their functions)."""
    if source.startswith("hf:"):
        return _hub(source[3:], split=split, streaming=streaming, **options)
    if source in EMBEDDED:
        ds = EMBEDDED[source](split=split, **options)
    elif Path(source).exists():
        ds = _local(Path(source), split=split, **options)
    else:
        raise ValueError(f"source={source!r} is neither an existing path nor a known name; {FORMS}")
    if streaming and isinstance(ds, datasets.Dataset):
        ds = ds.to_iterable_dataset(num_shards=max(1, min(len(ds), 64)))
    return ds


def _hub(name: str, *, split: str, streaming: bool, bbox_format: str = "xywh", **options):
    """A hub dataset with its columns mapped to ours (``img``→``image``, ``labels``/``fine_label``→``label``,
    ``objects.category``→``category_id``, ``xyxy`` boxes → ``xywh`` when ``bbox_format="xyxy"``)."""
    try:
        ds = datasets.load_dataset(name, split=split, streaming=streaming, **options)
    except ConnectionError as error:
        raise ConnectionError(
            f"source='hf:{name}': the HuggingFace hub is unreachable (offline: HF_HUB_OFFLINE="
            f"{os.environ.get('HF_HUB_OFFLINE', '0')}) and the dataset is not cached under "
            f"{datasets.config.HF_DATASETS_CACHE}. Run where the hub is reachable, or use a local copy; {FORMS}"
        ) from error
    renames = {old: new for old, new in (("img", "image"), ("labels", "label"), ("fine_label", "label"))
               if old in (ds.column_names or []) and new not in ds.column_names}
    ds = ds.rename_columns(renames) if renames else ds

    def objects(row):
        obj = dict(row["objects"])
        obj["category_id"] = obj.pop("category", obj.get("category_id"))
        if bbox_format == "xyxy":
            obj["bbox"] = [[x0, y0, x1 - x0, y1 - y0] for x0, y0, x1, y1 in obj["bbox"]]
        return {"objects": obj}

    return ds.map(objects) if "objects" in (ds.column_names or []) else ds


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _local(path: Path, *, split: str, images: str | None = None):
    """A folder of images (unlabelled), a class-per-subfolder folder (ids = subfolder names in sorted order), a
    COCO json (+ ``images`` folder), a saved dataset or parquet. A folder holding a subfolder named after ``split``
    (``validation`` also finds ``val``) is read from that subfolder."""
    if path.suffix == ".json":
        return _coco_json(path, images=Path(images) if images else None)
    if path.suffix == ".parquet" or (path.is_dir() and any(path.glob("*.parquet"))):
        files = [str(path)] if path.is_file() else sorted(map(str, path.glob("*.parquet")))
        return datasets.load_dataset("parquet", data_files=files, split="train")
    if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
        ds = datasets.load_from_disk(str(path))
        return ds[split] if isinstance(ds, datasets.DatasetDict) else ds
    for name in (split, "val", "valid") if split == "validation" else (split,):
        if (path / name).is_dir():
            path = path / name
            break
    classes = sorted(p.name for p in path.iterdir() if p.is_dir() and _images_in(p))
    if classes:
        files = [(str(f), i) for i, c in enumerate(classes) for f in _images_in(path / c)]
        features = datasets.Features(image=datasets.Image(), label=datasets.ClassLabel(names=classes))
        return datasets.Dataset.from_dict({"image": [f for f, _ in files], "label": [i for _, i in files]},
                                          features=features)
    files = _images_in(path)
    if not files:
        raise FileNotFoundError(f"source={str(path)!r}: no images ({sorted(IMAGE_SUFFIXES)}) in it or in class "
                                f"subfolders; {FORMS}")
    return datasets.Dataset.from_dict({"image": list(map(str, files))},
                                      features=datasets.Features(image=datasets.Image()))


def _coco_box(bbox) -> list[float] | None:
    """A COCO ``bbox`` as four finite floats, or None when it is missing, not four numbers, NaN or infinite."""
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        return None
    try:
        box = [float(v) for v in bbox]
    except (TypeError, ValueError):
        return None
    return box if all(math.isfinite(v) for v in box) else None


def _coco_json(path: Path, *, images: Path | None):
    """A COCO ``instances_*.json``; malformed annotations and boxes (missing, not four numbers, NaN, infinite),
    boxes of negative or zero size, boxes outside the image and unknown category or image ids are dropped (partly
    outside: clipped) with a warning that counts them. Crowd annotations stay, flagged ``iscrowd`` (ignore regions
    at evaluation, left out of training targets); each object keeps the json's ``area`` (COCO's is the mask's, which
    sets the small / medium / large split), else its box's."""
    try:
        coco = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"source={str(path)!r}: not valid JSON ({error})") from error
    lacking = [k for k in ("images", "categories") if not isinstance(coco, dict) or not isinstance(coco.get(k), list)]
    if lacking:
        raise ValueError(f"source={str(path)!r}: not a COCO instances json (no {' or '.join(map(repr, lacking))} "
                         "list)")
    if images is None:  # COCO layout: annotations/instances_val2017.json next to val2017/
        stem = path.stem.removeprefix("instances_")
        candidates = [path.parent.parent / stem, path.parent / stem, path.parent / "images", path.parent]
        images = next((c for c in candidates if c.is_dir() and _images_in(c)), None)
        if images is None:
            raise FileNotFoundError(f"source={str(path)!r}: no image folder among {[str(c) for c in candidates]}; "
                                    "pass images=FOLDER")
    for i, im in enumerate(coco["images"]):
        if not isinstance(im, dict) or any(k not in im for k in ("id", "file_name", "width", "height")):
            raise ValueError(f"source={str(path)!r}: images[{i}] needs 'id', 'file_name', 'width' and 'height'")
    cats = {c["id"]: c["name"] for c in coco["categories"]}
    sizes = {im["id"]: (im["width"], im["height"]) for im in coco["images"]}
    rows = {im["id"]: {"image": str(images / im["file_name"]), "image_id": im["id"],
                       "objects": {"bbox": [], "category_id": [], "area": [], "iscrowd": []}} for im in coco["images"]}
    dropped = Counter()
    for a in coco.get("annotations", []):
        if not isinstance(a, dict):
            dropped["malformed annotation"] += 1
            continue
        if a.get("category_id") not in cats or a.get("image_id") not in sizes:
            dropped["unknown category or image id"] += 1
            continue
        box = _coco_box(a.get("bbox"))
        if box is None:
            dropped["malformed bbox"] += 1
            continue
        w, h = sizes[a["image_id"]]
        x, y, bw, bh = box
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + bw, w), min(y + bh, h)
        if x1 - x0 <= 0 or y1 - y0 <= 0:
            dropped["negative size" if bw < 0 or bh < 0 else "outside the image" if bw > 0 and bh > 0
                    else "zero-area"] += 1
            continue
        dropped["clipped to the image"] += (x0, y0, x1, y1) != (x, y, x + bw, y + bh)
        area = a.get("area")
        area = float(area) if isinstance(area, (int, float)) and math.isfinite(area) and area > 0 else (
            (x1 - x0) * (y1 - y0))
        objects = rows[a["image_id"]]["objects"]
        objects["bbox"].append([x0, y0, x1 - x0, y1 - y0])
        objects["category_id"].append(a["category_id"])
        objects["area"].append(area)
        objects["iscrowd"].append(bool(a.get("iscrowd", 0)))
    if +dropped:
        warnings.warn(f"{path.name}: cleaned annotations: " + ", ".join(f"{k}: {n}" for k, n in sorted((+dropped).items())))
    names = [cats.get(i, f"N/A {i}") for i in range(max(cats, default=-1) + 1)]  # ClassLabel wants unique names
    return datasets.Dataset.from_list(list(rows.values()), features=detection_features(names, crowd=True))


def categories(dataset) -> dict[int, str]:
    """``{id: name}`` of a classification (``label``) or detection (``objects.category_id``) dataset; ids that
    name no category (gaps in COCO's ids, named "N/A i") are left out."""
    features = dataset.features
    label = features["objects"]["category_id"].feature if "objects" in features else features.get("label")
    if not isinstance(label, datasets.ClassLabel):
        raise ValueError(f"dataset has no ClassLabel names (features: {list(features)})")
    return {i: n for i, n in enumerate(label.names) if not n.startswith("N/A ")}


def coco(dataset):
    """The COCO ground truth of any detection dataset as a ``pycocotools.coco.COCO`` (its ``.dataset`` is the
    json dict), so evaluation is pycocotools' COCOeval everywhere. Images that cannot be read are left out (the
    loader skips and counts them)."""
    from pycocotools.coco import COCO

    rows = dataset.cast_column("image", datasets.Image(decode=False))
    images, annotations = [], []
    for row in rows:
        cell = row["image"]
        try:
            with Image.open(io.BytesIO(cell["bytes"]) if cell.get("bytes") else cell["path"]) as im:
                width, height = im.size  # reads the header only
        except DECODE_ERRORS:  # an unreadable image: the loader skips and counts it, so it has no detections
            continue
        images.append({"id": row["image_id"], "width": width, "height": height})
        objects = row["objects"]
        n = len(objects["bbox"])
        for box, cat, area, crowd in zip(objects["bbox"], objects["category_id"],
                                         objects.get("area") or [b[2] * b[3] for b in objects["bbox"]],
                                         objects.get("iscrowd") or [False] * n):
            annotations.append({"id": len(annotations) + 1, "image_id": row["image_id"], "bbox": list(box),
                                "area": area, "category_id": cat, "iscrowd": int(crowd)})
    gt = COCO()
    gt.dataset = {"images": images, "annotations": annotations,
                  "categories": [{"id": i, "name": n} for i, n in categories(dataset).items()]}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    return gt


# ----------------------------------------------------------------------------------------------------------------
# The decoded-image cache: each training image is decoded once (per loader process) and kept as uint8
# (:class:`augment.Decoded`)
# ----------------------------------------------------------------------------------------------------------------
class ImageCache:
    """Decoded images by key (a row of the dataset's Arrow table), least recently used out first, within ``budget``
    bytes (pixels + pyramid levels, counted as 4/3 of the pixels). Undecodable images are kept as ``(error,
    where)``, so a corrupt file is read once and its rows are still skipped and counted every time. Each loader
    process (the main one or each worker) holds its own; a pickled cache (a worker's copy) starts empty."""

    def __init__(self, budget: int):
        self.budget, self.entries, self.bytes, self.decodes = budget, {}, 0, 0

    def __getstate__(self):
        return {"budget": self.budget, "entries": {}, "bytes": 0, "decodes": 0}

    def get(self, key):
        value = self.entries.pop(key, None)
        if value is not None:
            self.entries[key] = value  # most recently used last (dicts keep insertion order)
        return value

    def put(self, key, value):
        cost = self._cost(value)
        if cost > self.budget or key in self.entries:
            return
        self.entries[key] = value
        self.bytes += cost
        while self.bytes > self.budget:
            self.bytes -= self._cost(self.entries.pop(next(iter(self.entries))))

    @staticmethod
    def _cost(value) -> int:
        return value.pixels.numel() * 4 // 3 + 64 if isinstance(value, Decoded) else 64


CACHE_BYTES = 1 << 30  # per loader, split over its worker processes


# ----------------------------------------------------------------------------------------------------------------
# Loading: batches for one rank; each sample exactly once per epoch across ranks
# ----------------------------------------------------------------------------------------------------------------
# PIL's errors for corrupt, truncated and non-image files and for decompression bombs (over twice MAX_IMAGE_PIXELS)
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


def _decode(cell, where: str) -> Decoded | tuple[Exception, str]:
    """The decoded image, or ``(error, where)`` for one that cannot be decoded."""
    try:
        return Decoded.from_pil(_open(cell))
    except DECODE_ERRORS as error:
        return error, where


def _batch(rows: list[dict], images: list, transform: Transform | None) -> dict:
    """Transform and stack decoded rows (``images[i]``: the ``Decoded`` image of ``rows[i]`` or ``(error,
    where)``) with ``transform.batch``; undecodable images are left out and listed under ``"bad"``."""
    batch = {"bad": [(image[1], image[0]) for image in images if not isinstance(image, Decoded)]}
    kept = [(row, image) for row, image in zip(rows, images) if isinstance(image, Decoded)]
    if not kept:
        batch["images"] = torch.empty(0)
        return batch
    rows, images = [row for row, _ in kept], [image for _, image in kept]
    boxes = None
    if "objects" in rows[0]:  # COCO xywh -> xyxy
        boxes = [torch.tensor(row["objects"]["bbox"], dtype=torch.float32).reshape(-1, 4) for row in rows]
        boxes = [torch.cat([b[:, :2], b[:, :2] + b[:, 2:]], 1) for b in boxes]
    if transform is None:
        if len({image.size for image in images}) > 1:
            raise ValueError("images of different sizes in one batch: pass transform= (augment.train_transform or "
                             "augment.eval_transform) to data.Loader")
        x = torch.stack([image.rgb() for image in images]).float() / 255
        sizes = torch.tensor([x.shape[2:]] * len(images))
        keep = None if boxes is None else [torch.ones(len(b), dtype=torch.bool) for b in boxes]
    elif transform.detection:
        x, sizes, boxes, keep = transform.batch(images, boxes=boxes)
    else:
        x, boxes = transform.batch(images), None
    batch["images"] = x
    if transform is not None and transform.detection:  # DETR's padding mask: True where an image does not reach
        batch["mask"] = ((torch.arange(x.shape[2])[None, :, None] >= sizes[:, 0, None, None])
                         | (torch.arange(x.shape[3])[None, None, :] >= sizes[:, 1, None, None]))
    if boxes is not None:
        # crowd regions (COCO's iscrowd) are no training targets: evaluation ignores them (data.coco)
        keep = [k & ~torch.tensor(row["objects"].get("iscrowd") or [False] * len(k), dtype=torch.bool).reshape(-1)
                for row, k in zip(rows, keep)]
        batch["targets"] = [  # boxes normalized by the image's own (unpadded) size, as DETR's
            {"boxes": torch.cat([(b[k, :2] + b[k, 2:]) / 2, b[k, 2:] - b[k, :2]], 1) / hw.flip(0).repeat(2),
             "labels": torch.tensor(row["objects"]["category_id"], dtype=torch.long)[k],
             "image_id": int(row["image_id"]), "orig_size": image.size, "size": tuple(hw.tolist())}
            for row, image, b, k, hw in zip(rows, images, boxes, keep, sizes)]
    labels = [row["label"] for row in rows if "label" in row]
    if labels:
        batch["labels"] = torch.tensor(labels, dtype=torch.long)
    return batch


def _where(cell, index) -> str:
    return cell.get("path") or f"row {index}" if isinstance(cell, dict) else f"row {index}"


@contextlib.contextmanager
def _seeded(*parts: int):
    """Seed torch (the batch's draws and kornia's) for one batch, on one thread (the batch's kernels are small;
    more threads only contend), restoring the caller's RNG and threads afterwards."""
    threads = torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):  # the CPU generator only: torch.manual_seed would also visit (and
        # format a stack trace for) every lazy accelerator, ~0.3 ms a batch
        torch.default_generator.manual_seed(int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0]))
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)


META_IN_MEMORY = 100_000  # rows: a map-style source's other columns are read into memory up to this size


class _Rows(torch.utils.data.Dataset):
    """A map-style dataset read a batch at a time, ``(epoch, indices)`` per batch; each batch's augmentations are
    seeded by (seed, epoch, batch), so runs repeat exactly whatever the number of workers. Decoded images are kept
    in an :class:`ImageCache` keyed by their row of the Arrow table (a ``select`` that repeats rows, as ``photos``
    does, maps the repeats to one row), and only the images not in it are read from the table."""

    def __init__(self, dataset, transform, seed: int, cache: ImageCache):
        self.transform, self.seed, self.cache = transform, seed, cache
        self.images = dataset.select_columns(["image"])
        others = [c for c in dataset.column_names if c != "image"]
        self.meta = dataset.select_columns(others) if others else None
        if self.meta is not None and len(self.meta) <= META_IN_MEMORY:  # read once: an Arrow slice costs ~0.4 ms
            self.meta = self.meta[:]                                      # a batch, more than its crops' resize
        mapping = getattr(dataset, "_indices", None)  # `datasets`' index mapping (select, shuffle, filter)
        self.table_rows = mapping.column(0).to_numpy() if mapping is not None else None

    def __getitems__(self, batch: tuple[int, list[int]]) -> dict:
        epoch, indices = batch
        keys = self.table_rows[indices].tolist() if self.table_rows is not None else list(indices)
        found = {key: self.cache.get(key) for key in keys}
        missing = {key: index for key, index in zip(keys, indices) if found[key] is None}
        if missing:
            cells = self.images[list(missing.values())]["image"]
            for (key, index), cell in zip(missing.items(), cells):
                found[key] = _decode(cell, _where(cell, index))
                self.cache.decodes += 1
                self.cache.put(key, found[key])
        if isinstance(self.meta, dict):
            rows = [{name: column[i] for name, column in self.meta.items()} for i in indices]
        elif self.meta is not None:
            columns = self.meta[list(indices)]
            rows = [dict(zip(columns, values)) for values in zip(*columns.values())]
        else:
            rows = [{} for _ in indices]
        with _seeded(self.seed, epoch, indices[0]):
            return _batch(rows, [found[key] for key in keys], self.transform)


class _Plan:
    """The batch sampler of a map-style :class:`Loader`: its current epoch's batches as ``(epoch, indices)``, read
    when an iteration starts, so one DataLoader (and its persistent workers, with their caches) serves every epoch."""

    def __init__(self, loader: "Loader"):
        self.loader = weakref.ref(loader)  # no cycle: a dropped Loader shuts its workers down at once

    def __iter__(self):
        loader = self.loader()
        return iter([(loader.epoch, b) for b in loader._batches()[loader.skip:]])

    def __len__(self) -> int:
        loader = self.loader()
        return max(0, len(loader._batches()) - loader.skip)


class _Stream(torch.utils.data.IterableDataset):
    """An IterableDataset read in batches (`datasets` gives each worker its own shards); rows are seen once an
    epoch, so nothing is cached."""

    def __init__(self, dataset, transform, batch_size: int, seed: int):
        self.dataset, self.transform, self.batch_size, self.seed = dataset, transform, batch_size, seed

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, rows = (info.id if info else 0), []
        for count, row in enumerate(self.dataset, 1):
            rows.append(row)
            if len(rows) == self.batch_size:
                yield self._batch(rows, worker, count)
                rows = []
        if rows:
            yield self._batch(rows, worker, -1)

    def _batch(self, rows, worker, count):
        images = [_decode(r["image"], _where(r["image"], "stream")) for r in rows]
        with _seeded(self.seed, self.dataset.epoch, worker, count % 2**31):
            return _batch(rows, images, self.transform)


def rank_batches(n: int, *, batch_size: int, rank: int, world_size: int, shuffle: bool, seed: int,
                 epoch: int) -> list[list[int]]:
    """Rank ``rank``'s batches of indices: one permutation per (seed, epoch), full batches of ``batch_size`` dealt
    to the ranks in turn, and the remainder split evenly over all ranks (with the previous round when it holds
    fewer samples than ranks), so every sample is seen exactly once and all ranks take the same number of steps
    (possible unless ``n < 2·world_size`` or ``batch_size == 1`` with ``n`` not a multiple of ``world_size``)."""
    order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    step = batch_size * world_size
    full = n // step * step
    if 0 < n - full < world_size and full:
        full -= step
    head = order[:full].reshape(-1, world_size, batch_size)[:, rank].tolist()
    chunks = math.ceil((n - full) / step) * world_size
    tail = [c.tolist() for c in np.array_split(order[full:], chunks)[rank::world_size]] if chunks else []
    return head + [c for c in tail if c]


class Loader:
    """Batches for one rank: ``{"images": (B, 3, H, W) float in [0, 1], "labels": (B,) long}`` (classification),
    ``{"images", "mask": (B, H, W) True on padding, "targets": [{"boxes": (n, 4) cx, cy, w, h normalized by the
    image's unpadded size, "labels": (n,), "image_id", "orig_size": (h, w), "size": (h, w) unpadded in the
    batch}]}`` (detection, DETR's convention) or
    just ``images`` (unlabelled). Call ``set_epoch(e)`` each epoch.
    Undecodable images are skipped and counted in ``self.bad``; a batch with none left is dropped, or with
    ``replace_unreadable`` (training) replaced by the batch before it (the first such batches by the next readable
    one), so that every rank yields as many batches as it was dealt and takes as many steps (``self.replaced``
    counts them).

    This process's share: with an ``accelerator``, its process index, count and device (do not pass the loader to
    ``accelerator.prepare``: it is sharded already); otherwise ``rank`` and ``world_size``. Map-style datasets are
    dealt by :func:`rank_batches` and keep up to ``cache_bytes`` of decoded images (:class:`ImageCache`, split evenly
    over ``num_workers``, which persist across epochs), so repeated rows and later epochs decode nothing while they
    fit; streams are split by ``split_dataset_by_node``, then shuffled in a buffer of ``buffer_size``."""

    def __init__(self, dataset, *, batch_size: int, transform: Transform | None = None, shuffle: bool = False,
                 num_workers: int = 0, seed: int = 0, accelerator=None, rank: int = 0, world_size: int = 1,
                 buffer_size: int = 1000, cache_bytes: int = CACHE_BYTES, bad: BadImages | None = None,
                 replace_unreadable: bool = False):
        if accelerator is not None:
            rank, world_size = accelerator.process_index, accelerator.num_processes
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank}, world_size={world_size}: expected 0 <= rank < world_size")
        device = accelerator.device if accelerator is not None else None
        self.stream = isinstance(dataset, datasets.IterableDataset)
        dataset = dataset.cast_column("image", datasets.Image(decode=False))
        if self.stream:
            dataset = datasets.distributed.split_dataset_by_node(dataset, rank=rank, world_size=world_size)
            dataset = dataset.shuffle(seed=seed, buffer_size=buffer_size) if shuffle else dataset
        self.dataset, self.transform, self.batch_size, self.shuffle = dataset, transform, batch_size, shuffle
        self.num_workers, self.seed, self.rank, self.world_size, self.device = (num_workers, seed, rank,
                                                                                world_size, device)
        self.epoch, self.skip, self.bad = 0, 0, BadImages() if bad is None else bad
        self.replace_unreadable, self.replaced = replace_unreadable, 0
        self.cache, self._source = ImageCache(cache_bytes // max(1, num_workers)), None  # one per process

    def set_epoch(self, epoch: int, *, skip: int = 0):
        """Iterate epoch ``epoch`` next, starting after its first ``skip`` batches (a resumed run); map-style
        datasets skip them without reading them."""
        self.epoch, self.skip = epoch, skip

    def _batches(self) -> list[list[int]]:
        return rank_batches(len(self.dataset), batch_size=self.batch_size, rank=self.rank,
                            world_size=self.world_size, shuffle=self.shuffle, seed=self.seed, epoch=self.epoch)

    def __len__(self) -> int:
        if self.stream:
            raise TypeError("a streamed dataset has no length")
        return len(self._batches())

    def __iter__(self):
        common = {"num_workers": self.num_workers, "collate_fn": _identity}
        if self.stream:
            self.dataset.set_epoch(self.epoch)
            source = torch.utils.data.DataLoader(_Stream(self.dataset, self.transform, self.batch_size,
                                                         self.seed * 1000003 + self.rank), batch_size=None, **common)
        else:
            if self._source is None:
                self._source = torch.utils.data.DataLoader(
                    _Rows(self.dataset, self.transform, self.seed, self.cache), batch_sampler=_Plan(self),
                    persistent_workers=self.num_workers > 0, **common)
            source = self._source
        if self.stream and self.skip:  # a stream has no index: read past what was used
            source = itertools.islice(source, self.skip, None)
        last, owed = None, 0  # the last readable batch; unreadable ones still to replace
        for batch in source:
            for where, error in batch.pop("bad"):
                self.bad.add(where, error)
            if not len(batch["images"]):
                if self.replace_unreadable and last is not None:
                    self.replaced += 1
                    yield last
                elif self.replace_unreadable:
                    owed += 1
                continue
            last = self._to_device(batch)
            for _ in range(owed + 1):
                yield last
            self.replaced, owed = self.replaced + owed, 0

    def _to_device(self, batch: dict) -> dict:
        if self.device is None:
            return batch
        batch = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}
        if "targets" in batch:
            batch["targets"] = [{k: v.to(self.device) if torch.is_tensor(v) else v for k, v in t.items()}
                                for t in batch["targets"]]
        return batch


def _identity(batch):
    return batch
