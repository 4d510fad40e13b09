"""Fuzzing the data path: a folder of images with truncated, zero-byte, non-image and
huge-dimension files, and a COCO json with broken boxes, through ``data.load`` -> ``data.loader`` (with the task's
transform) -> a training step. The bad ones are skipped and counted (``loader.bad``), the good ones all arrive."""
import json
import math
import re
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data
import train

ROOT = Path(__file__).resolve().parents[1]

# name: (PIL mode, size (w, h), colour); every good image is one uniform colour, so a crop of it says which it was
GOOD = {
    "a/red.png": ("RGB", (40, 30), (200, 30, 30)),
    "a/grey.png": ("L", (25, 25), (90, 90, 90)),
    "a/alpha.png": ("RGBA", (20, 20), (30, 200, 30)),
    "a/palette.gif": ("P", (24, 18), (30, 30, 200)),
    "a/one_pixel.png": ("RGB", (1, 1), (250, 250, 20)),
    "b/thin.png": ("RGB", (3, 400), (20, 220, 220)),
    "b/photo.jpg": ("RGB", (48, 40), (120, 60, 180)),
    "b/cmyk.jpg": ("CMYK", (30, 30), (230, 140, 40)),
    "b/png_named.jpg": ("RGB", (32, 32), (60, 160, 60)),  # PNG bytes under a JPEG name: Pillow reads the content
    "b/grey_alpha.png": ("LA", (16, 16), (170, 170, 170)),
    "b/sixteen_bit.png": ("I;16", (20, 20), (40000,)),  # 16-bit grey: 40000 / 65535 of full scale
}
BAD = ["a/empty.png", "a/notes.jpg", "a/truncated.png", "b/truncated.jpg", "b/bomb.png", "b/bad_crc.png"]


def _noise(h: int, w: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` pixels (a decompression bomb to Pillow), with a tiny body."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def _write_good(path: Path, mode: str, size, colour):
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "I;16":
        image = Image.fromarray(np.full(size[::-1], colour[0], np.uint16))
    elif mode == "P":
        image = Image.new("RGB", size, colour).quantize(colors=4)  # uniform, unlike a dithered conversion
    elif mode in ("L", "LA"):
        image = Image.new(mode, size, colour[0] if mode == "L" else (colour[0], 128))
    else:
        image = Image.new("RGB", size, colour).convert(mode)
    if mode == "RGBA":
        image.putalpha(100)
    image.save(path, format="PNG" if path.name == "png_named.jpg" else None, **(
        {"quality": 95} if path.suffix == ".jpg" and path.name != "png_named.jpg" else {}))


def _expected_colour(path: Path, mode: str, colour) -> np.ndarray:
    """The colour the data path should deliver, from Pillow directly (16-bit: the value scaled to 8 bits)."""
    if mode == "I;16":
        return np.full(3, colour[0] / 65535)
    return np.asarray(Image.open(path).convert("RGB"), np.float64).mean((0, 1)) / 255


def image_folder(root: Path) -> dict[str, tuple[int, np.ndarray]]:
    """Write GOOD and BAD into ``root`` (a class-per-subfolder layout, classes a and b) and a text file that is not
    listed at all; return each good file's (label, expected colour)."""
    good = {}
    for name, (mode, size, colour) in GOOD.items():
        _write_good(root / name, mode, size, colour)
        good[name] = ("ab".index(name[0]), _expected_colour(root / name, mode, colour))
    png, jpg = root / "noise.png", root / "noise.jpg"
    _noise(40, 50).save(png)
    _noise(40, 50, 1).save(jpg, quality=90)
    (root / "a" / "empty.png").write_bytes(b"")
    (root / "a" / "notes.jpg").write_text("a shopping list, not an image\n")
    (root / "a" / "truncated.png").write_bytes(png.read_bytes()[: png.stat().st_size // 2])
    (root / "b" / "truncated.jpg").write_bytes(jpg.read_bytes()[:300])
    (root / "b" / "bomb.png").write_bytes(_png_claiming(100_000, 100_000))
    raw = bytearray(png.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # one flipped byte inside the image data: the chunk's CRC no longer matches
    (root / "b" / "bad_crc.png").write_bytes(bytes(raw))
    png.unlink()
    jpg.unlink()
    (root / "a" / "README.txt").write_text("not an image suffix: not listed, not counted")
    return good


def match(colours: torch.Tensor, good: dict) -> list[str]:
    """The good file each delivered image (its mean colour) came from; each must be within 0.02 of one."""
    names = list(good)
    expected = torch.tensor(np.stack([good[n][1] for n in names]), dtype=torch.float32)
    distance = (colours[:, None, :] - expected[None]).abs().amax(-1)
    nearest = distance.argmin(1)
    assert (distance.min(1).values < 0.02).all(), distance.min(1).values
    return [names[i] for i in nearest.tolist()]


FINOLA = ["--task", "finola", "--data-options", "{}", "--encoder", "mf-tiny", "--channels", "16", "--grid", "2",
          "--image-size", "32", "--widths", "16", "16", "16", "16", "16", "--batch-size", "4", "--lr", "0.05",
          "--warmup-epochs", "0", "--log-every", "1", "--pca-images", "0", "--spectral-loss", "0",
          "--colour-jitter", "0", "--optimizer", "adamw"]


@pytest.mark.parametrize("streaming, workers", [(False, 0), (False, 1), (True, 0)])
def test_a_folder_with_bad_files_delivers_every_good_image_once(tmp_path, streaming, workers):
    good = image_folder(tmp_path / "images")
    ds = data.load(str(tmp_path / "images"), streaming=streaming)
    args = train.parse_args(FINOLA + ["--data", str(tmp_path / "images")])
    transform = train.TASKS["finola"].transform(args)  # the task's training transform: random resized crops
    loader = data.Loader(ds, batch_size=4, transform=transform, shuffle=True, seed=1, num_workers=workers)
    colours, labels = [], []
    for batch in loader:
        x = batch["images"]
        assert x.shape[1:] == (3, 32, 32) and torch.isfinite(x).all()
        assert (x.amax((2, 3)) - x.amin((2, 3))).max() < 0.02, "a uniform image stays uniform"
        colours.append(x.mean((2, 3)))
        labels += batch["labels"].tolist()
    arrived = match(torch.cat(colours), good)
    assert sorted(arrived) == sorted(good), "every good image, exactly once"
    assert labels == [good[name][0] for name in arrived], "each with its own label"
    assert loader.bad.total() == len(BAD), loader.bad.summary()
    report = loader.bad.summary()
    for name in BAD:
        assert name.split("/")[1] in report, report
    assert "DecompressionBombError" in report and "README" not in report


def test_a_training_step_on_the_folder(tmp_path, capsys):
    good = image_folder(tmp_path / "images")
    out = tmp_path / "run"
    train.main(FINOLA + ["--data", str(tmp_path / "images"), "--max-steps", "1", "--out", str(out)])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1] and math.isfinite(steps[0]["loss"])
    assert rows[-1]["final"]["images"] == len(good), "the final evaluation reads every good image and no bad one"
    assert (out / "model.safetensors").exists()
    skipped = re.search(r"bad images: (\d+) skipped", capsys.readouterr().err)
    assert skipped and int(skipped.group(1)) >= len(BAD), "the final evaluation alone meets every bad file"


def only_bad_images(tmp_path):
    """A folder of two files with image names and no image in them."""
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "empty.png").write_bytes(b"")
    (folder / "text.jpg").write_text("no pixels here")
    return folder


def test_ladder_refuses_a_folder_of_only_bad_images(tmp_path):
    """ladder.py draws its crops epoch after epoch: on a folder whose every image is unreadable it must stop with one
    line (exit status 2), not loop for ever (the timeout)."""
    folder = only_bad_images(tmp_path)
    loader = data.Loader(data.load(str(folder)), batch_size=2)
    assert list(loader) == [] and loader.bad.total() == 2
    done = subprocess.run([sys.executable, "ladder.py", "--data", str(folder), "--image-size", "16", "--crops", "8"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]  # after its progress bar, one line: the error
    last = done.stderr.strip().splitlines()[-1]
    assert re.match(r"ladder.py: error: --data '.*bad': the training split gave no readable images", last), last


# --- a COCO json with broken boxes ---------------------------------------------------------------------------------

def coco_folder(root: Path) -> Path:
    """val2017/ with three good images (one smaller than its json entry says), a text file and an empty file under
    image names, and one listed image that is missing; annotations/instances_val2017.json with broken boxes."""
    images = root / "val2017"
    images.mkdir(parents=True)
    _noise(40, 50).save(images / "a.png")
    _noise(64, 64, 1).save(images / "b.png")
    _noise(30, 30, 2).save(images / "c.jpg")
    (images / "text.png").write_text("not an image")
    (images / "zero.png").write_bytes(b"")
    listed = [(1, "a.png", 50, 40), (2, "b.png", 64, 64), (3, "c.jpg", 60, 60),  # c is really 30 x 30
              (4, "text.png", 50, 40), (5, "zero.png", 50, 40), (6, "missing.png", 50, 40)]
    nan, inf = float("nan"), float("inf")
    annotations = [
        (1, [5, 5, 10, 10], 1),           # good
        (1, [40, 30, 20, 20], 2),         # partly outside: clipped to [40, 30, 10, 10]
        (1, [5, 5, -10, 10], 1),          # negative width
        (1, [60, 5, 10, 10], 1),          # outside the image
        (1, [nan, 5, 10, 10], 1),         # NaN
        (1, [5, 5, inf, 10], 1),          # infinite
        (1, None, 1),                     # null
        (1, "missing", 1),                # no bbox key at all
        (2, [1, 2, 3], 1),                # three numbers
        (2, ["x", 1, 2, 3], 1),           # not numbers
        (2, [10, 10, 20, 20], 2),         # good
        (2, [0, 0, 0, 0], 2),             # zero-area
        (3, [40, 40, 15, 15], 1),         # inside the json's 60 x 60, outside the real 30 x 30 image
        (4, [5, 5, 10, 10], 1),           # good box on an unreadable image
        (9, [5, 5, 10, 10], 1),           # unknown image id
        (2, [5, 5, 10, 10], 7),           # unknown category
    ]
    coco = {"images": [{"id": i, "file_name": f, "width": w, "height": h} for i, f, w, h in listed],
            "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}], "annotations": []}
    for k, (image_id, box, category) in enumerate(annotations):
        a = {"id": k, "image_id": image_id, "category_id": category, "iscrowd": 0}
        if box != "missing":
            a["bbox"] = box
        coco["annotations"].append(a)
    coco["annotations"] += [None, "not an annotation"]
    path = root / "annotations" / "instances_val2017.json"
    path.parent.mkdir()
    path.write_text(json.dumps(coco))  # NaN and Infinity as JSON's common extension, which json.loads reads
    return path


CLEANED = ("clipped to the image: 1, malformed annotation: 2, malformed bbox: 6, negative size: 1, "
           "outside the image: 1, unknown category or image id: 2, zero-area: 1")
# 64 px, not 32: at 32 px the decoder's first BatchNorm sees a 1x1 map, so a batch that bad files leave with one image
# (or any one-image batch) cannot be normalized in training; at 64 px it sees 2x2.
DETR = ["--task", "detr-probe", "--data-options", "{}", "--encoder", "mf-tiny", "--decoder", "mf-dec-tiny",
        "--num-queries", "10", "--image-size", "64", "--batch-size", "4", "--log-every", "1"]


def test_a_coco_json_with_broken_boxes(tmp_path):
    path = coco_folder(tmp_path)
    with pytest.warns(UserWarning, match=CLEANED):
        ds = data.load(str(path))
    rows = {row["image_id"]: row["objects"] for row in ds.select_columns(["image_id", "objects"])}
    assert sorted(rows) == [1, 2, 3, 4, 5, 6]
    assert rows[1] == {"bbox": [[5, 5, 10, 10], [40, 30, 10, 10]], "category_id": [1, 2], "area": [100, 100],
                       "iscrowd": [False, False]}
    assert rows[2] == {"bbox": [[10, 10, 20, 20]], "category_id": [2], "area": [400], "iscrowd": [False]}
    assert all(math.isfinite(v) for objects in rows.values() for box in objects["bbox"] for v in box)

    args = train.parse_args(DETR + ["--data", str(path)])
    seen, boxes = [], 0
    loader = data.Loader(ds, batch_size=4, transform=train.TASKS["detr-probe"].transform(args), shuffle=True)
    for batch in loader:
        x = batch["images"]  # DETR's sizes at 64: shorter sides 38..64 (longer <= 107), a padded batch with its mask
        assert x.shape[1] == 3 and 38 <= min(x.shape[2:]) and max(x.shape[2:]) <= 108
        assert batch["mask"].shape == (len(x), *x.shape[2:])
        for target in batch["targets"]:
            seen.append(target["image_id"])
            b = target["boxes"]  # cx, cy, w, h in [0, 1]
            assert torch.isfinite(b).all() and (b >= 0).all() and (b <= 1).all() and (b[:, 2:] > 0).all()
            assert len(target["labels"]) == len(b)
            boxes += len(b)
    assert sorted(seen) == [1, 2, 3], "the readable images, each once"
    assert boxes <= 3, "c.jpg's box lies outside the real image: dropped by the transform"
    assert loader.bad.total() == 3
    for name in ("text.png", "zero.png", "missing.png"):
        assert name in loader.bad.summary()
    gt = data.coco(ds)  # the ground truth leaves the unreadable images out instead of failing on them
    assert sorted(gt.imgs) == [1, 2, 3] and gt.imgs[3] == {"id": 3, "width": 30, "height": 30}


def test_a_detection_training_step_on_the_broken_json(tmp_path):
    path = coco_folder(tmp_path)
    out = tmp_path / "run"
    with pytest.warns(UserWarning, match=CLEANED):
        train.main(DETR + ["--data", str(path), "--max-steps", "1", "--out", str(out)])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1] and math.isfinite(steps[0]["loss"])
    assert rows[-1]["final"]["images"] == 3 and (out / "model.safetensors").exists()


def test_malformed_coco_files_get_one_line_errors(tmp_path):
    (tmp_path / "images").mkdir()
    _noise(8, 8).save(tmp_path / "images" / "a.png")
    for name, text, expected in (("broken.json", '{"images": [', "not valid JSON"),
                                 ("list.json", "[1, 2]", "not a COCO instances json (no 'images' or 'categories'"),
                                 ("nocats.json", '{"images": []}', "not a COCO instances json (no 'categories' list)"),
                                 ("nosize.json", '{"images": [{"id": 1, "file_name": "a.png"}], "categories": []}',
                                  "images[0] needs 'id', 'file_name', 'width' and 'height'")):
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError) as e:
            data.load(str(tmp_path / name), images=str(tmp_path / "images"))
        assert name in str(e.value) and expected in str(e.value) and "\n" not in str(e.value)


def test_training_refuses_a_folder_of_only_bad_images(tmp_path):
    """An epoch without one readable image stops the run with the bad-image report instead of looping forever."""
    folder = only_bad_images(tmp_path)
    with pytest.raises(ValueError, match=r"epoch 0 gave no readable training images; 2 unreadable files skipped, e\.g\. "):
        train.main(FINOLA + ["--data", str(folder), "--max-steps", "1", "--out", str(tmp_path / "run")])
