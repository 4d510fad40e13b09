"""The embedded data sources: real images that ship inside package wheels, and a synthetic detection set.

Each is offline (no download), generated once and cached by `datasets` under HF_HOME, and reached through
``data.load(name, split=...)``; ``EMBEDDED`` maps the names to the functions below. Origins and licences are in
USAGE.md. Rows follow data.py's conventions.
"""
from __future__ import annotations

import contextlib
import gzip
import importlib.util
import io
import warnings
import xml.etree.ElementTree as ET
from pathlib import Path

import datasets
import numpy as np
from PIL import Image


def detection_features(names: list[str], *, crowd: bool = False) -> datasets.Features:
    """The features of detection rows (every detection source's, COCO json folders' too); ``crowd``: objects also
    carry COCO's ``area`` and ``iscrowd`` (crowd regions are ignored by COCO's evaluation and left out of training
    targets)."""
    objects = {"bbox": datasets.List(datasets.List(datasets.Value("float32"), length=4)),
               "category_id": datasets.List(datasets.ClassLabel(names=names))}
    if crowd:
        objects |= {"area": datasets.List(datasets.Value("float32")), "iscrowd": datasets.List(datasets.Value("bool"))}
    return datasets.Features(image=datasets.Image(), image_id=datasets.Value("int64"), objects=objects)


def _open_rgb(path: str) -> Image.Image:
    """A shipped image file (8-bit RGB, RGBA, palette or grey) as RGB."""
    with Image.open(path) as image:
        return image.convert("RGB")


# ----------------------------------------------------------------------------------------------------------------
# Embedded sources (offline, no download). Each is generated once and cached by `datasets` under HF_HOME.
# ----------------------------------------------------------------------------------------------------------------
def _package_dir(package: str, install: str) -> Path:
    """A package's folder found without importing it (find_spec on a top-level package runs no code of it)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed; {install}")
    return Path(spec.submodule_search_locations[0])


def _cached(generator, features, **kwargs) -> datasets.Dataset:
    with contextlib.redirect_stderr(io.StringIO()):  # silence the progress bar of the first generation
        return datasets.Dataset.from_generator(generator, features=features, gen_kwargs=kwargs)


def _check_split(name: str, split: str, splits: tuple[str, ...]):
    if split not in splits:
        raise ValueError(f"split={split!r}: the embedded source {name!r} has the splits {list(splits)}")


# photos: scikit-image's colour photos (CC0 / public domain), split by photo; the training split adds the wallpapers
# of two Debian packages when they are installed (more photos teach an encoder more than 7 can).
PHOTOS = {"train": ("astronaut.png", "chelsea.png", "hubble_deep_field.jpg", "ihc.png", "motorcycle_left.png",
                    "motorcycle_right.png", "retina.jpg"),
          "validation": ("coffee.png", "rocket.jpg")}
PHOTO_SIDE = 256  # photos are stored with this shorter side, so a 64² crop covers 1/16 to 1/4 of a photo's side
WALLPAPER_PACKAGES = ("plasma-workspace-wallpapers", "ukui-wallpapers")
WALLPAPER_INSTALL = "sudo apt-get install " + " ".join(WALLPAPER_PACKAGES)
PLASMA_DIR, UKUI_DIR = Path("/usr/share/wallpapers"), Path("/usr/share/backgrounds")


def wallpapers() -> list[Path]:
    """The wallpapers of Debian's ``plasma-workspace-wallpapers`` (KDE, GPL-2+; one image per theme: its largest
    landscape one) and ``ukui-wallpapers`` (Ubuntu Kylin, CC-BY-SA-3.0); 30 + 12 images when both are installed,
    photographs and digital art. Missing packages give an empty list (``photos`` then warns)."""
    themes = {}
    for f in sorted(PLASMA_DIR.glob("*/contents/images/*")):
        if f.suffix.lower() in (".jpg", ".jpeg", ".png"):
            w, h = Image.open(f).size
            best = themes.get(f.parts[-4])
            if best is None or (w >= h, w * h) > (best[1] >= best[2], best[1] * best[2]):
                themes[f.parts[-4]] = (f, w, h)
    ukui = sorted(f for f in UKUI_DIR.glob("*") if f.suffix.lower() in (".jpg", ".jpeg", ".png"))
    return [f for f, _, _ in themes.values()] + ukui


def _photos(split: str, extra: tuple[str, ...] = ()) -> list[Image.Image]:
    folder = _package_dir("skimage", "pip install scikit-image") / "data"
    out = []
    for path in [folder / name for name in PHOTOS[split]] + [Path(p) for p in extra]:
        im = _open_rgb(str(path))
        scale = PHOTO_SIDE / min(im.size)
        out.append(im.resize((round(im.width * scale), round(im.height * scale)), Image.Resampling.LANCZOS))
    return out


def _photo_rows(split: str, size: int, crops_per_photo: int, extra: tuple[str, ...] = ()):
    rng = np.random.default_rng(0)  # validation: the same crops for everyone, always
    for i, im in enumerate(_photos(split, extra)):
        if split == "train":
            yield {"image": im, "label": i}
            continue
        for _ in range(crops_per_photo):
            side = int(rng.integers(size, min(im.size) + 1))
            x, y = rng.integers(0, im.width - side + 1), rng.integers(0, im.height - side + 1)
            crop = im.crop((int(x), int(y), int(x) + side, int(y) + side))
            yield {"image": crop.resize((size, size), Image.Resampling.LANCZOS), "label": i}


def photos(*, split: str = "train", size: int = 64, crops_per_photo: int = 64,
           with_wallpapers: bool = True) -> datasets.Dataset:
    """Colour photos from the scikit-image wheel, split by photo (``PHOTOS``), stored at a shorter side of 256.
    ``train``: each photo ``crops_per_photo`` times (rows per epoch); random crops come from the training transform
    (Table 12's RandomResizedCrop), new each epoch. With ``with_wallpapers`` (the default) the training split also
    holds :func:`wallpapers` (42 images when both Debian packages are installed; a warning naming the apt command
    when they are not). ``validation``: ``crops_per_photo`` fixed ``size``² crops per held-out photo (random squares
    of side ``size``..256, resized), identical on every run so PSNR is comparable. ``label`` is the photo's index
    within its split."""
    _check_split("photos", split, ("train", "validation"))
    if split == "validation":
        names = [Path(n).stem for n in PHOTOS[split]]
        features = datasets.Features(image=datasets.Image(), label=datasets.ClassLabel(names=names))
        return _cached(_photo_rows, features, split=split, size=size, crops_per_photo=crops_per_photo)
    extra = tuple(map(str, wallpapers())) if with_wallpapers else ()
    if with_wallpapers and not extra:
        warnings.warn(f"photos: the wallpapers of {' and '.join(WALLPAPER_PACKAGES)} are not installed, so the "
                      f"training split holds only the {len(PHOTOS['train'])} scikit-image photos (expect lower "
                      f"held-out PSNR). On Debian/Ubuntu: `{WALLPAPER_INSTALL}`", stacklevel=2)
    names = [Path(n).stem for n in PHOTOS[split]] + [
        Path(p).parts[-4] if Path(p).is_relative_to(PLASMA_DIR) else Path(p).stem for p in extra]
    features = datasets.Features(image=datasets.Image(), label=datasets.ClassLabel(names=names))
    ds = _cached(_photo_rows, features, split=split, size=0, crops_per_photo=0, extra=extra)
    return ds.select(np.repeat(np.arange(len(ds)), crops_per_photo))  # an index mapping, no copies


# fashion-mnist: Debian's dataset-fashion-mnist (MIT), the official 60k / 10k split.
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_INSTALL = "install it with `sudo apt-get install dataset-fashion-mnist`"
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot"]


def _fashion_rows(prefix: str):
    with gzip.open(FASHION_DIR / f"{prefix}-images-idx3-ubyte.gz") as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(FASHION_DIR / f"{prefix}-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)
    for image, label in zip(images, labels):
        yield {"image": image, "label": int(label)}


def fashion_mnist(*, split: str = "train") -> datasets.Dataset:
    """Fashion-MNIST, 28×28 grey (the loader makes it RGB), 10 classes: ``train`` 60,000, ``test`` 10,000
    (``validation`` is the same official test split)."""
    _check_split("fashion-mnist", split, ("train", "test", "validation"))
    prefix = "train" if split == "train" else "t10k"
    files = [FASHION_DIR / f"{prefix}-{kind}-ubyte.gz" for kind in ("images-idx3", "labels-idx1")]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"source='fashion-mnist' reads {FASHION_DIR}, which lacks {', '.join(missing)}: "
                                f"{FASHION_INSTALL} (Debian/Ubuntu), or use "
                                "'hf:zalando-datasets/fashion_mnist' where the hub is reachable")
    features = datasets.Features(image=datasets.Image(), label=datasets.ClassLabel(names=FASHION_CLASSES))
    return _cached(_fashion_rows, features, prefix=prefix)


# trees: the deepforest wheel's NEON aerial images with their tree-crown boxes (Pascal VOC), split by image.
TREES = {"train": ("2019_YELL_2_528000_4978000_image_crop2", "OSBS_029"),
         "validation": ("2019_YELL_2_541000_4977000_image_crop", "SOAP_061")}
NODEPS = "install it with `pip install --no-deps -r requirements-nodeps.txt` (never with its dependencies)"


def _tree_rows(split: str, size: int, min_visible: float):
    folder = _package_dir("deepforest", NODEPS) / "data"
    image_id = 0
    for stem in TREES[split]:
        image = _open_rgb(str(folder / f"{stem}.png"))
        xml = ET.parse(folder / f"{stem}.xml").getroot()
        boxes = np.array([[float(o.find("bndbox").find(k).text) for k in ("xmin", "ymin", "xmax", "ymax")]
                          for o in xml.iter("object")])
        for y in range(0, image.height, size):  # tiles past the right and bottom edges are padded black
            for x in range(0, image.width, size):
                clip = np.clip(boxes - [x, y, x, y], 0, size)
                visible = np.prod(clip[:, 2:] - clip[:, :2], 1) / np.prod(boxes[:, 2:] - boxes[:, :2], 1)
                kept = clip[visible >= min_visible]
                yield {"image": image.crop((x, y, x + size, y + size)), "image_id": image_id,
                       "objects": {"bbox": np.c_[kept[:, :2], kept[:, 2:] - kept[:, :2]].tolist(),
                                   "category_id": [0] * len(kept)}}
                image_id += 1


def trees(*, split: str = "train", size: int = 400, min_visible: float = 0.5) -> datasets.Dataset:
    """Tree crowns in NEON aerial RGB (10 cm/px) from the deepforest wheel: 951 boxes (``Tree``; SOAP_061's
    ``Dead``/``Alive`` are also crowns) in four images, split by image, cut into ``size``² tiles (edge tiles
    padded black). A box cut by a tile border is kept (clipped) where at least ``min_visible`` of its area is inside. One category: 0 ``tree``.
    ``train``: YELL 2299×2472 (574 boxes) + OSBS_029 400² (61); ``validation``: YELL 1249×1035 (279) +
    SOAP_061 400² (37)."""
    _check_split("trees", split, ("train", "validation"))
    return _cached(_tree_rows, detection_features(["tree"]), split=split, size=size, min_visible=min_visible)


# shapes: synthetic detection, generated deterministically from a seed.
SHAPES = ("circle", "square", "triangle", "cross")
PALETTE = np.array([[1, 0, 0], [0, 0.8, 0], [0, 0, 1], [1, 1, 0], [1, 0, 1], [0, 1, 1], [1, 1, 1], [0, 0, 0]])


def _shape_mask(kind: int, cx: float, cy: float, r: float, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    dx, dy = np.abs(xx - cx), np.abs(yy - cy)
    if kind == 0:
        return dx ** 2 + dy ** 2 <= r ** 2
    if kind == 1:
        return (dx <= r) & (dy <= r)
    if kind == 2:  # apex up, base down
        return (dy <= r) & (dx <= (yy - cy + r) / 2)
    return ((dx <= r) & (dy <= r / 3)) | ((dx <= r / 3) & (dy <= r))


def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """A smooth random colour field with oriented stripes and grain, in [0.1, 0.9]."""
    coarse = Image.fromarray(rng.integers(40, 215, (4, 4, 3), dtype=np.uint8))
    smooth = np.asarray(coarse.resize((size, size), Image.Resampling.BICUBIC), np.float64) / 255
    yy, xx = np.mgrid[:size, :size]
    angle, period = rng.uniform(0, np.pi), rng.uniform(4, 16)
    stripes = 0.08 * np.sin(2 * np.pi * (xx * np.cos(angle) + yy * np.sin(angle)) / period)
    return np.clip(smooth + stripes[..., None] + rng.normal(0, 0.03, (size, size, 3)), 0.1, 0.9)


def _shape_rows(split: str, n: int, size: int, max_objects: int, background: str, seed: int):
    rng = np.random.default_rng([seed, ("train", "validation").index(split)])
    backdrops = _photos(split) if background == "photo" else None
    yy, xx = np.mgrid[:size, :size] + 0.5  # pixel centres
    for image_id in range(n):
        if backdrops:
            photo = backdrops[rng.integers(len(backdrops))]
            x, y = rng.integers(0, photo.width - size + 1), rng.integers(0, photo.height - size + 1)
            canvas = np.asarray(photo.crop((int(x), int(y), int(x) + size, int(y) + size)), np.float64) / 255
        else:
            canvas = _texture(rng, size)
        boxes, kinds = [], []
        for _ in range(rng.integers(1, max_objects + 1)):
            kind, r = int(rng.integers(len(SHAPES))), rng.uniform(size / 14, size / 5)
            cx, cy = rng.uniform(r, size - r, 2)
            mask = _shape_mask(kind, cx, cy, r, yy, xx)
            ys, xs = np.nonzero(mask)
            box = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
            if any((box[:2] <= b[2:] + 1).all() and (b[:2] <= box[2:] + 1).all() for b in boxes):
                continue  # objects never touch, so every box frames exactly one whole object
            canvas[mask] = PALETTE[rng.integers(len(PALETTE))]
            boxes.append(box)
            kinds.append(kind)
        boxes = np.array(boxes, np.float64)
        yield {"image": Image.fromarray((canvas * 255).round().astype(np.uint8)), "image_id": image_id,
               "objects": {"bbox": np.c_[boxes[:, :2], boxes[:, 2:] - boxes[:, :2]].tolist(), "category_id": kinds}}


def shapes(*, split: str = "train", n: int | None = None, size: int = 64, max_objects: int = 3,
           background: str = "texture", seed: int = 0) -> datasets.Dataset:
    """Synthetic detection: 1..``max_objects`` non-touching shapes (``SHAPES``: circle, square, triangle, cross;
    ids 0..3) of random size and colour on ``size``² images, with exact boxes (the tight extent of the drawn pixels).
    ``background``: ``"texture"`` (random smooth colour field with stripes) or ``"photo"`` (crops of the
    ``photos`` of the same split). ``n`` images: 2000 for ``train``, 200 for ``validation`` by default; the two
    splits draw from independent streams of ``seed``."""
    _check_split("shapes", split, ("train", "validation"))
    if background not in ("texture", "photo"):
        raise ValueError(f"background={background!r}: expected 'texture' or 'photo'")
    n = n if n is not None else (2000 if split == "train" else 200)
    return _cached(_shape_rows, detection_features(list(SHAPES)), split=split, n=n, size=size,
                   max_objects=max_objects, background=background, seed=seed)


EMBEDDED = {"photos": photos, "fashion-mnist": fashion_mnist, "trees": trees, "shapes": shapes}
