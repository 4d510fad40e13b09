"""The metrics of trained models, each written once: ``train.py`` ends a run with its task's evaluation and
``eval.py`` runs the same one again on a weights file (``evaluate``).

    reconstruct   PSNR of FINOLA reconstructions next to mean colour, bilinear and PCA with k = q's numbers (§4, Table 2)
    detect        COCO box AP of a DETR model through pycocotools' COCOeval (Tables 4, 18)
    masked        PSNR of a masked FINOLA model's prediction of the masked region from the centred block (§3)
    mae           MAE's loss on a fixed draw of removed patches, next to each patch's mean colour (Table 6's peer)
    classify      top-1 / top-5 accuracy of a classifier (Tables 1, 3, 5-7)

Each evaluation (``EVALUATIONS``) says how its images are prepared from the run's flags (a weights file keeps them
in its metadata) and which PNG it draws beside the weights.
"""
from __future__ import annotations

import contextlib
import io
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from pycocotools.cocoeval import COCOeval
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

import analysis
import augment
import data
import detection
import mae
from analysis import psnr

console = Console(stderr=True)


# ---------------------------------------------------------------------------------------------------------------------
# Reconstruction (§4): PSNR and its baselines
# ---------------------------------------------------------------------------------------------------------------------

def mean_colour(x: torch.Tensor) -> torch.Tensor:
    """Baseline: every pixel replaced by its image's mean colour."""
    return x.mean((2, 3), keepdim=True).expand_as(x)


def bilinear(x: torch.Tensor, grid) -> torch.Tensor:
    """Baseline: bilinear (antialiased) down to the FINOLA grid's resolution, then bilinear back up."""
    small = F.interpolate(x, size=tuple(grid), mode="bilinear", antialias=True, align_corners=False)
    return F.interpolate(small, size=x.shape[-2:], mode="bilinear", align_corners=False)


def training_crops(model, train_source: str, options: dict, *, n: int = 20000, seed: int = 0, batch_size: int = 256,
                   bad: data.BadImages | None = None, label: str = "training crops"):
    """Batches of ``n`` crops of ``train_source``'s training split (``options`` go to ``data.load``) drawn by the
    training transform (RandomResizedCrop + flip at the model's image size) epoch after epoch from ``seed``: the
    same crops every time, under a progress bar. Unreadable images are counted in ``bad``."""
    ds = data.load(train_source, split="train", **options)
    loader = data.Loader(ds, batch_size=batch_size, shuffle=True, seed=seed, bad=bad,
                         transform=augment.train_transform("crop", size=model.image_size[0]))
    columns = (TextColumn(f"[bold]{label}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TimeElapsedColumn())
    seen = 0
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task(label, total=n)
        for epoch in itertools.count():
            loader.set_epoch(epoch)
            before = seen
            for batch in loader:
                x = batch["images"][: n - seen]
                seen += len(x)
                progress.advance(task, len(x))
                yield x
                if seen >= n:
                    return
            if seen == before:
                raise ValueError(f"{train_source!r}: the training data gave no images")


def pca_baseline(model, train_source: str, options: dict, *, n: int = 20000, seed: int = 0,
                 batch_size: int = 256, bad: data.BadImages | None = None) -> dict:
    """The best linear code with as many numbers as q: ``analysis.fit_pca`` with k = ``model.latent`` (M C)
    components over ``n`` :func:`training_crops`. Raises ``analysis.PCATooLarge`` before reading any data when the
    images have more than ``analysis.PCA_MAX_DIM`` numbers (the paper's 256²)."""
    size, k = model.image_size[0], model.latent
    analysis.check_pca_size(3 * size * size, k)
    crops = training_crops(model, train_source, options, n=n, seed=seed, batch_size=batch_size, bad=bad,
                           label="PCA crops")
    return analysis.fit_pca(crops, k, max_images=n)


@torch.no_grad()
def reconstruct(model, loader, *, figure: Path | None = None, show: int = 8, pca: dict | None = None) -> dict:
    """Mean per-image PSNR of ``model``'s reconstructions over ``loader``, next to the mean-colour and bilinear
    baselines on the same images; optionally a PNG of originals (top row) above reconstructions (bottom row).
    With ``pca`` (``pca_baseline``'s) also the PCA baseline ``pca_db``: each image as mean + P Pᵀ (x − mean),
    unclamped like the model's output (``psnr`` clamps both alike), with ``pca_images`` (the crops it was fitted on)
    and ``pca_explained`` (the fraction of their variance in its k components).
    A model with ``norm="moving-average"`` is scored with its running statistics (``psnr_db``) and with the
    per-position normalization it trained with (``psnr_layer_norm_db``), §4's "Is normalization necessary?"."""
    model.eval()
    moving = getattr(model.config, "norm", "layer") == "moving-average"
    scores = {"psnr_db": [], "mean_colour_db": [], "bilinear_db": []}
    scores |= ({"pca_db": []} if pca is not None else {}) | ({"psnr_layer_norm_db": []} if moving else {})
    shown = []
    for batch in loader:
        x = batch["images"]
        y = model(x)
        scores["psnr_db"].append(psnr(x, y))
        if moving:  # §4's ablation: the same model normalizing per position, as it did in training
            with model.per_position_norm():
                scores["psnr_layer_norm_db"].append(psnr(x, model(x)))
        scores["mean_colour_db"].append(psnr(x, mean_colour(x)))
        scores["bilinear_db"].append(psnr(x, bilinear(x, model.config.grid)))
        if pca is not None:
            scores["pca_db"].append(psnr(x, analysis.pca_reconstruct_images(x, pca)))
        if len(shown) < show:
            shown += list(zip(x, y))[: show - len(shown)]
    if not scores["psnr_db"]:
        raise ValueError("reconstruct: the data gave no images")
    out = {k: round(torch.cat(v).mean().item(), 3) for k, v in scores.items()}
    out["images"] = len(torch.cat(scores["psnr_db"]))
    if pca is not None:
        out |= {"pca_images": pca["images"], "pca_explained": round(pca["explained"], 4)}
    if figure is not None:
        save_grid([torch.stack([a for a, _ in shown]), torch.stack([b for _, b in shown])], figure)
    return out


def reconstruct_with_pca(model, loader, train_source: str, options: dict, *, pca_images: int = 20000,
                         figure: Path | None = None, bad: data.BadImages | None = None) -> dict:
    """``reconstruct`` with the PCA baseline fitted on ``pca_images`` crops of the weights' own training data
    (``pca_baseline(model, train_source, options, bad=bad)``; 0 skips it). When the images are too large for an
    exact PCA, ``pca_db`` is None and a one-line note says why."""
    if not pca_images:
        return reconstruct(model, loader, figure=figure)
    try:
        pca = pca_baseline(model, train_source, options, n=pca_images, bad=bad)
    except analysis.PCATooLarge as error:
        console.print(f"PCA baseline skipped: {error}")
        return reconstruct(model, loader, figure=figure) | {"pca_db": None, "pca_images": 0, "pca_explained": None}
    console.print(f"PCA baseline: k = {pca['basis'].shape[1]} components explain {pca['explained']:.1%} of the "
                  f"variance of {pca['images']} training crops of {train_source}")
    return reconstruct(model, loader, figure=figure, pca=pca)


def save_grid(rows: list[torch.Tensor], path, *, pad: int = 2, min_side: int = 128) -> Path:
    """Save rows of images (each (N, 3, H, W) in [0, 1]) as one PNG, with a white ``pad`` between tiles; small
    images are enlarged (nearest neighbour, an integer factor) to at least ``min_side`` pixels so they can be seen."""
    n = max(len(r) for r in rows)
    scale = max(1, -(-min_side // min(rows[0].shape[-2:])))
    rows = [F.interpolate(r.float(), scale_factor=scale, mode="nearest") if scale > 1 else r for r in rows]
    h, w = rows[0].shape[-2:]
    canvas = torch.ones(3, len(rows) * (h + pad) + pad, n * (w + pad) + pad)
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            top, left = pad + i * (h + pad), pad + j * (w + pad)
            canvas[:, top:top + h, left:left + w] = img.float().clamp(0, 1)
    return analysis.save_image(Image.fromarray((canvas.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)), path)


# ---------------------------------------------------------------------------------------------------------------------
# Detection (Tables 4, 18): COCO AP
# ---------------------------------------------------------------------------------------------------------------------

AP_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


@torch.no_grad()
def detect(model, loader, coco_gt, *, figure: Path | None = None, show: int = 6,
           threshold: float | None = None) -> dict:
    """COCO box AP of a DETR model over ``loader`` against ``coco_gt`` (``data.coco(dataset)``), with
    pycocotools' COCOeval; optionally a PNG of ``show`` images with true (green) and predicted (red, score >=
    ``threshold``: by default 0.5 for a softmax detector, 0.3 for a focal one, whose per-class sigmoids run lower)
    boxes."""
    model.eval()
    results, shown = [], []
    for batch in loader:
        targets = batch["targets"]
        outputs = model(batch["images"], batch.get("mask"))
        dets = detection.postprocess(outputs, [t["orig_size"] for t in targets], image_ids=[t["image_id"] for t in targets],
                                class_loss=model.config.class_loss)
        results += dets
        for i in range(min(len(targets), show - len(shown))):
            h, w = targets[i]["size"]  # the image without its padding
            shown.append((batch["images"][i, :, :h, :w], targets[i],
                          [d for d in dets if d["image_id"] == targets[i]["image_id"]]))
    if not results:
        raise ValueError("detect: the data gave no images")
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its own tables
        coco_dt = coco_gt.loadRes(results)
        ev = COCOeval(coco_gt, coco_dt, "bbox")
        ev.params.imgIds = sorted({r["image_id"] for r in results})
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    out = {name: round(float(v), 4) for name, v in zip(AP_NAMES, ev.stats[:6])}
    out["images"] = len(ev.params.imgIds)
    if figure is not None:
        if threshold is None:
            threshold = 0.3 if model.config.class_loss == "focal" else 0.5
        draw_detections(shown, figure, threshold=threshold)
    return out


def draw_detections(shown, path, *, threshold: float = 0.5, scale: int = 4) -> Path:
    """One row of images (upscaled ``scale``x) with true boxes in green and predictions above ``threshold`` in red."""
    tiles = []
    for image, target, dets in shown:
        h, w = image.shape[-2:]
        tile = Image.fromarray((image.permute(1, 2, 0).clamp(0, 1).numpy() * 255).astype(np.uint8))
        tile = tile.resize((w * scale, h * scale), Image.Resampling.NEAREST)
        pen = ImageDraw.Draw(tile)
        oh, ow = target["orig_size"]
        sx, sy = w * scale / ow, h * scale / oh
        for cx, cy, bw, bh in target["boxes"].tolist():
            pen.rectangle([(cx - bw / 2) * w * scale, (cy - bh / 2) * h * scale,
                           (cx + bw / 2) * w * scale, (cy + bh / 2) * h * scale], outline=(0, 255, 0), width=2)
        for d in dets:
            if d["score"] >= threshold:
                x, y, bw, bh = d["bbox"]
                pen.rectangle([x * sx, y * sy, (x + bw) * sx, (y + bh) * sy], outline=(255, 0, 0), width=2)
                pen.text((x * sx + 2, y * sy + 1), f"{d['category_id']}:{d['score']:.2f}", fill=(255, 0, 0))
        tiles.append(torch.from_numpy(np.array(tile)).permute(2, 0, 1).float() / 255)
    h, w = max(t.shape[1] for t in tiles), max(t.shape[2] for t in tiles)  # images of their own sizes, padded
    return save_grid([torch.stack([F.pad(t, (0, w - t.shape[2], 0, h - t.shape[1])) for t in tiles])], path)


# ---------------------------------------------------------------------------------------------------------------------
# Masked FINOLA (§3): the masked region predicted from the centred block
# ---------------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def masked_reconstruct(model, loader, *, figure: Path | None = None, show: int = 8) -> dict:
    """Mean per-image PSNR over the masked region of a masked FINOLA model's prediction from the centred block (eval
    mode), next to filling that region with the visible block's mean colour; optionally a PNG of originals, what the
    encoder sees (masked region grey) and the prediction with the visible block pasted back."""
    model.eval()
    scores = {"masked_psnr_db": [], "block_colour_db": []}
    shown = []
    for batch in loader:
        x = batch["images"]
        y, mask = model(x)
        m = mask.to(x.dtype)
        block_colour = (x * (1 - m)).sum((2, 3), keepdim=True) / (1 - m).sum((2, 3), keepdim=True)
        for key, guess in (("masked_psnr_db", y.clamp(0, 1)), ("block_colour_db", block_colour.expand_as(x))):
            mse = ((x - guess).square() * m).sum((1, 2, 3)) / (m.sum((1, 2, 3)) * x.shape[1])
            scores[key].append(10 * torch.log10(1 / mse.clamp_min(1e-12)))
        if len(shown) < show:
            rows = (x, x * (1 - m) + 0.5 * m, x * (1 - m) + y.clamp(0, 1) * m)
            shown += list(zip(*rows))[: show - len(shown)]
    if not scores["masked_psnr_db"]:
        raise ValueError("masked: the data gave no images")
    out = {k: round(torch.cat(v).mean().item(), 3) for k, v in scores.items()}
    out["images"] = len(torch.cat(scores["masked_psnr_db"]))
    if figure is not None:
        save_grid([torch.stack([row[i] for row in shown]) for i in range(3)], figure)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Classification (Tables 1, 3, 5-7): top-1 / top-5
# ---------------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def classify(model, loader) -> dict:
    """Top-1 accuracy of a classifier over ``loader``, and top-5 when there are at least 5 classes."""
    model.eval()
    hits1 = hits5 = n = 0
    classes = 0
    for batch in loader:
        if "labels" not in batch:
            raise ValueError("classify: the data has no labels")
        logits = model(batch["images"])
        classes = logits.shape[1]
        hit = logits.topk(min(5, classes), dim=1).indices == batch["labels"][:, None]
        hits1 += hit[:, 0].sum().item()
        hits5 += hit.any(1).sum().item()
        n += len(hit)
    if not n:
        raise ValueError("classify: the data gave no images")
    return {"top1": round(hits1 / n, 4)} | ({"top5": round(hits5 / n, 4)} if classes >= 5 else {}) | {"images": n}


# ---------------------------------------------------------------------------------------------------------------------
# The evaluations: how each prepares its images from the run's flags, what it measures, the figure it draws
# ---------------------------------------------------------------------------------------------------------------------

def whole(model, train: dict, image_size: int | None = None):
    """The whole (centre square of the) image at the model's input size, or ``image_size`` / the training size."""
    size = image_size or getattr(model, "image_size", (None,))[0] or train.get("image_size", 224)
    return augment.eval_transform("classify", size=size, crop_ratio=1.0)


def centre(model, train: dict, image_size: int | None = None):
    """ImageNet's evaluation crop: shorter side to size / crop_ratio, centre size² (the run's crop_ratio, 0.875)."""
    return augment.eval_transform("classify", size=image_size or train.get("image_size", 224),
                               crop_ratio=train.get("crop_ratio", 0.875))


def resize(model, train: dict, image_size: int | None = None):
    """DETR's evaluation resize: shorter side to the run's image size (800 in the paper)."""
    return augment.eval_transform("detect", size=image_size or train.get("image_size", 800))


def measure_reconstruct(model, loader, *, figure, train: dict, bad) -> dict:
    """``reconstruct`` with the PCA baseline fitted on --pca-images crops of the run's own training data."""
    options = {**train.get("data_options", {}), "streaming": train.get("streaming", False)}
    return reconstruct_with_pca(model, loader, train["data"], options, pca_images=train.get("pca_images", 20000),
                                figure=figure, bad=bad)


def measure_detect(model, loader, *, figure, train: dict, bad) -> dict:
    return detect(model, loader, data.coco(loader.dataset), figure=figure)


def measure_masked(model, loader, *, figure, train: dict, bad) -> dict:
    return masked_reconstruct(model, loader, figure=figure)


def measure_mae(model, loader, *, figure, train: dict, bad) -> dict:
    result, rows = mae.evaluate(model, loader)
    if figure is not None:
        save_grid(rows, figure)
    return result


def measure_classify(model, loader, *, figure, train: dict, bad) -> dict:
    return classify(model, loader)


@dataclass(frozen=True)
class Evaluation:
    reads: tuple         # the architectures it evaluates (weights' metadata "model"."arch")
    transform: Callable  # (model, train flags, image_size override) -> the data transform
    measure: Callable    # (model, loader, *, figure, train, bad) -> figures
    figure: str | None   # the PNG it draws, beside the weights (None: none)


EVALUATIONS = {
    "reconstruct": Evaluation(("finola",), whole, measure_reconstruct, "reconstructions.png"),
    "detect": Evaluation(("detr",), resize, measure_detect, "detections.png"),
    "masked": Evaluation(("masked-e", "masked-b"), whole, measure_masked, "predictions.png"),
    "mae": Evaluation(("mae",), whole, measure_mae, "predictions.png"),
    "classify": Evaluation(("classifier",), centre, measure_classify, None),
}


def evaluation_loader(name: str, model, *, source: str, split: str, options: dict, train: dict, batch_size: int,
                      image_size: int | None = None, bad: data.BadImages | None = None) -> data.Loader:
    """The images ``EVALUATIONS[name]`` measures: ``source``'s ``split`` prepared for ``model`` as the run with
    flags ``train`` was; ``.dataset`` and ``.source`` come with it."""
    ds = data.load(source, split=split, **options)
    loader = data.Loader(ds, batch_size=batch_size, transform=EVALUATIONS[name].transform(model, train, image_size),
                         bad=bad)
    loader.source = source
    return loader


def figure_path(name: str, out: Path | None) -> Path | None:
    """Where ``EVALUATIONS[name]`` draws its PNG in the folder ``out`` (None: it draws none)."""
    figure = EVALUATIONS[name].figure
    return None if out is None or figure is None else Path(out) / figure


def evaluate(name: str, model, loader, *, out: Path | None, train: dict, bad: data.BadImages | None = None) -> dict:
    """The figures of ``EVALUATIONS[name]`` for ``model`` over ``loader`` (``evaluation_loader``), its PNG drawn at
    ``figure_path(name, out)``; ``train``: the run's flags (a weights file's metadata "train")."""
    return EVALUATIONS[name].measure(model.eval(), loader, figure=figure_path(name, out), train=train, bad=bad)
