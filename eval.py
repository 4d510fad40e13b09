"""Metrics and evaluations of our checkpoints: ``python eval.py COMMAND --weights FILE ...``.

Every command has one shape: it loads and checks its weights once, loads its data once (``--data``, default the data
the weights were trained on), prints a rich table, writes its figures to ``--out`` (default: the weights' folder) and
ends with exactly one line of JSON holding its figures. Importing this module does no work, so its functions
(``reconstruct``, ``detect``, ``classify``, ...) serve notebooks and tests.

    reconstruct   PSNR of FINOLA reconstructions next to three baselines (mean colour, bilinear, PCA with k = C),
                  and a PNG grid (§4, Table 2)
    detect        COCO AP of a DETR model through pycocotools' COCOeval, and a PNG of boxes (Tables 4, 18)
    curvature     Gaussian curvature of the maps' critical channels, several checkpoints overlaid (Eq. 9, Fig. 5)
    embedding     the space of q: its mean, interpolations, mirrors, Gaussian samples, PCA (App. E.2)
    pde           Eq. 2's residuals on the maps and a numerical look at Eq. 4 (App. A)
    encode        an image to a .q file (FINOLA as a codec);  decode: a .q file back to a PNG
    rate-distortion  bytes per image and PSNR of q (float16, 8-bit) against JPEG at matched sizes
    masked        PSNR of a masked FINOLA model's prediction of the masked region from the centred block (§3)
    mae           MAE's loss on a fixed draw of removed patches, next to each patch's mean colour (Table 6's peer)
    classify      top-1 / top-5 accuracy of a classifier (linear / tran-1 probes, fine-tuned, supervised; Tables 1, 3)
    curves        loss, lr, img/s and final metrics of training runs against step, overlaid (``python eval.py curves
                  RUN [RUN ...]``, runs.py)
    export        a folder ready to upload to the hub: model.safetensors and a model card (README.md); every
                  --weights / --init also takes hf:ORG/REPO[/FILE]
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
from pathlib import Path

import contextlib
import io

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from pycocotools.cocoeval import COCOeval
from rich.table import Table

import analysis
import codec
import data
import runs
import weights
from analysis import gaussian_curvature, psnr  # noqa: F401  (eval.gaussian_curvature, eval.psnr: public API)

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


def reconstruct_transform(model):
    """Resize the shorter side to the model's image size and centre-crop it (the whole square of a square image)."""
    return data.eval_transform("classify", size=model.image_size[0], crop_ratio=1.0)


def _crops(loader, n: int):
    """The image batches of ``loader``, epoch after epoch (``set_epoch``), until ``n`` images, under a progress bar."""
    columns = (TextColumn("[bold]PCA crops"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TimeElapsedColumn())
    seen = 0
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("PCA crops", total=n)
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
                raise ValueError("pca_baseline: the training data gave no images")


def pca_baseline(model, train_source: str, options: dict, *, n: int = 20000, seed: int = 0,
                 batch_size: int = 256, bad: data.BadImages | None = None) -> dict:
    """The best linear code with as many numbers as q: ``analysis.fit_pca`` with k = C (``model.config.channels``)
    components over ``n`` crops of ``train_source``'s training split (``options`` go to ``data.load``), drawn by the
    training transform (RandomResizedCrop + flip at the model's image size) epoch after epoch from ``seed``: the
    same crops every time. Raises ``analysis.PCATooLarge`` before reading any data when the images have more than
    ``analysis.PCA_MAX_DIM`` numbers (the paper's 256²). Unreadable images are counted in ``bad``."""
    size, k = model.image_size[0], model.config.channels
    analysis.check_pca_size(3 * size * size, k)
    ds = data.load(train_source, split="train", **options)
    loader = data.loader(ds, batch_size=batch_size, transform=data.train_transform("crop", size=size), shuffle=True,
                         seed=seed, bad=bad)
    return analysis.fit_pca(_crops(loader, n), k, max_images=n)


@torch.no_grad()
def reconstruct(model, loader, *, grid: Path | None = None, show: int = 8, pca: dict | None = None) -> dict:
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
    if grid is not None:
        save_grid([torch.stack([a for a, _ in shown]), torch.stack([b for _, b in shown])], grid)
    return out


def reconstruct_with_pca(model, loader, train_source: str, options: dict, *, pca_images: int = 20000,
                         grid: Path | None = None, bad: data.BadImages | None = None) -> dict:
    """``reconstruct`` with the PCA baseline fitted on ``pca_images`` crops of the weights' own training data
    (``pca_baseline(model, train_source, options, bad=bad)``; 0 skips it). When the images are too large for an
    exact PCA, ``pca_db`` is None and a one-line note says why."""
    if not pca_images:
        return reconstruct(model, loader, grid=grid)
    try:
        pca = pca_baseline(model, train_source, options, n=pca_images, bad=bad)
    except analysis.PCATooLarge as error:
        console.print(f"PCA baseline skipped: {error}")
        return reconstruct(model, loader, grid=grid) | {"pca_db": None, "pca_images": 0, "pca_explained": None}
    console.print(f"PCA baseline: k = {pca['basis'].shape[1]} components explain {pca['explained']:.1%} of the "
                  f"variance of {pca['images']} training crops of {train_source}")
    return reconstruct(model, loader, grid=grid, pca=pca)


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
    import detection  # only this evaluation needs it

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
def masked_reconstruct(model, loader, *, grid: Path | None = None, show: int = 8) -> dict:
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
    if grid is not None:
        save_grid([torch.stack([row[i] for row in shown]) for i in range(3)], grid)
    return out


def mae_reconstruct(model, loader, *, grid: Path | None = None, show: int = 8, seed: int = 0) -> dict:
    """``mae.evaluate`` (MAE's loss on a fixed draw of removed patches, next to each patch's mean colour), with its
    figure rows (originals, visible patches, predictions) as a PNG at ``grid``."""
    import mae

    result, rows = mae.evaluate(model, loader, show=show, seed=seed)
    if grid is not None:
        save_grid(rows, grid)
    return result


# ---------------------------------------------------------------------------------------------------------------------
# Classification (Tables 1, 3, 5-7): top-1 / top-5
# ---------------------------------------------------------------------------------------------------------------------

def classify_transform(size: int, *, crop_ratio: float = 0.875):
    """Resize the shorter side to size / crop_ratio and centre-crop size^2 (ImageNet's 0.875; 1 keeps it whole)."""
    return data.eval_transform("classify", size=size, crop_ratio=crop_ratio)


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
# Commands. Each has one shape: load and check its weights once (``load_checked``), load its data once (``_loader``),
# compute with the functions above, print a table, write its figures to --out (default: the (first) weights' folder)
# and return the figures that ``main`` prints as the one JSON line.
# ---------------------------------------------------------------------------------------------------------------------

READS = {"reconstruct": ("finola",), "detect": ("detr",), "curvature": ("finola", "masked-e", "masked-b"),
         "embedding": ("finola",), "pde": ("finola",), "encode": ("finola",), "decode": ("finola",),
         "rate-distortion": ("finola",), "masked": ("masked-e", "masked-b"), "classify": ("classifier",),
         "mae": ("mae",)}
WRITTEN_BY = {"finola": "finola", "masked-e": "masked-e", "masked-b": "masked-b", "mae": "mae",
              "detr": "detr-probe or detr-finetune",
              "classifier": "linprobe, tran1-probe, finetune or supervised"}  # arch -> the train.py tasks


def load_checked(path, command: str):
    """The model of ``path``, which must be of an architecture that ``command`` reads (``READS``)."""
    model = weights.load_model(path)
    arch, archs = model.metadata["model"]["arch"], READS[command]
    if arch not in archs:
        raise ValueError(f"--weights: {path} holds a {arch!r} model; {command} needs a "
                         f"{' or '.join(map(repr, archs))} model (train.py --task "
                         f"{' or '.join(WRITTEN_BY[a] for a in archs)})")
    return model


def _default_data(meta: dict, source: str | None) -> tuple[str, dict]:
    """The data to evaluate on: --data, or what the weights were trained on (from the file's metadata)."""
    options = meta["train"].get("data_options", {}) if source is None else {}
    source = source or meta.get("data")
    if not source:
        raise ValueError("--data: the weights' metadata names no training data; pass --data SOURCE")
    return source, options


def _loader(args, model, transform=None, *, data_of=None):
    """A loader of --data (default: the training data of ``data_of``'s weights, else ``model``'s) [--split] for
    ``model``: ``transform`` or reconstruct's; unreadable images counted in ``args.bad``. Its ``.dataset`` and
    ``.source`` come with it."""
    source, options = _default_data((data_of or model).metadata, args.data)
    loader = data.loader(data.load(source, split=args.split, **options), batch_size=args.batch_size,
                         transform=transform or reconstruct_transform(model), bad=args.bad)
    loader.source = source
    return loader


def _out(args, name: str = "") -> Path:
    """Where a command writes the figure ``name`` (none: the folder itself): --out, or the (first) --weights file's
    folder."""
    first = args.weights[0] if isinstance(args.weights, list) else args.weights
    folder = args.out or (Path(".") if str(first).startswith(weights.HUB) else Path(first).parent)
    return Path(folder) / name


def _row(title: str, row: dict) -> None:
    """A command's figures as one row under their names."""
    table = Table(title=escape(title))
    for name in row:
        table.add_column(name, justify="right")
    table.add_row(*row.values())
    console.print(table)


def _report(title: str, result: dict) -> None:
    """A command's many figures as a two-column table (numbers to 4 significant digits)."""
    table = Table(title=escape(title))
    table.add_column("figure")
    table.add_column("value", justify="right")
    for k, v in result.items():
        values = v if isinstance(v, list) else [v]
        table.add_row(k, ", ".join(f"{x:.4g}" if isinstance(x, float) else str(x) for x in values))
    console.print(table)


def cmd_reconstruct(args) -> dict:
    if args.pca_images < 0:
        raise ValueError(f"--pca-images: expected 0 (no PCA baseline) or a number of crops, got {args.pca_images}")
    model = load_checked(args.weights, "reconstruct")
    loader = _loader(args, model)
    meta = model.metadata  # the PCA learns from the weights' own training data, whatever --data evaluates
    train_source, train_options = _default_data(meta, None)
    figure = _out(args, "reconstruct.png")
    result = reconstruct_with_pca(model, loader, train_source,
                                  {**train_options, "streaming": meta["train"].get("streaming", False)},
                                  pca_images=args.pca_images, grid=figure, bad=args.bad)
    names = {"psnr_db": "model", "psnr_layer_norm_db": "model, per-position norm", "mean_colour_db": "mean colour",
             "bilinear_db": f"bilinear via {model.config.grid[0]}x{model.config.grid[1]}",
             "pca_db": f"PCA, k = {model.config.channels}"}
    _row(f"Reconstruction PSNR on {loader.source} [{args.split}], {result['images']} images",
         {names[k]: "-" if result[k] is None else f"{result[k]:.2f} dB" for k in names if k in result})
    return result | {"figure": str(figure)}


def cmd_detect(args) -> dict:
    model = load_checked(args.weights, "detect")
    size = args.image_size or model.metadata["train"].get("image_size", 800)
    loader = _loader(args, model, data.eval_transform("detect", size=size))
    figure = _out(args, "detect.png")
    result = detect(model, loader, data.coco(loader.dataset), figure=figure)
    _row(f"COCO box AP on {loader.source} [{args.split}], {result['images']} images at {size}x{size}",
         {k: f"{100 * result[k]:.1f}" if result[k] >= 0 else "-" for k in AP_NAMES})  # -1: no such boxes
    return result | {"figure": str(figure)}


def cmd_masked(args) -> dict:
    model = load_checked(args.weights, "masked")
    loader = _loader(args, model)
    figure = _out(args, "masked.png")
    result = masked_reconstruct(model, loader, grid=figure)
    _row(f"Masked-region PSNR on {loader.source} [{args.split}], {result['images']} images, centred block "
         f"(figure: originals, visible blocks, predictions)",
         {model.metadata["model"]["arch"]: f"{result['masked_psnr_db']:.2f} dB",
          "block's mean colour": f"{result['block_colour_db']:.2f} dB"})
    return result | {"figure": str(figure)}


def cmd_mae(args) -> dict:
    model = load_checked(args.weights, "mae")
    loader = _loader(args, model, data.eval_transform("classify", size=args.image_size or
                                                      model.metadata["train"].get("image_size", 224), crop_ratio=1.0))
    figure = _out(args, "mae.png")
    result = mae_reconstruct(model, loader, grid=figure)
    _row(f"MAE's loss on the removed patches of {loader.source} [{args.split}], {result['images']} images (figure: "
         f"originals, visible patches, predictions)", {"model": f"{result['mae_loss']:.4f}",
                                                        "each patch's mean colour": f"{result['patch_mean_loss']:.4f}"})
    return result | {"figure": str(figure)}


def cmd_classify(args) -> dict:
    model = load_checked(args.weights, "classify")
    train = model.metadata["train"]
    size = args.image_size or train.get("image_size", 224)
    loader = _loader(args, model, classify_transform(size, crop_ratio=train.get("crop_ratio", 0.875)))
    result = classify(model, loader)
    _row(f"Classification on {loader.source} [{args.split}], {result['images']} images at {size}x{size}, "
         f"{model.config.decoder} decoder", {k: f"{100 * result[k]:.2f}%" for k in ("top1", "top5") if k in result})
    return result


def cmd_curvature(args) -> dict:
    models = [load_checked(w, "curvature") for w in args.weights]
    labels = args.labels or [Path(w).parent.name or Path(w).stem for w in args.weights]
    if len(labels) != len(models) or len(set(labels)) != len(labels):
        raise ValueError(f"--labels: expected {len(models)} distinct labels, one per --weights file, got {labels}")
    loaders = [_loader(args, m, data_of=models[0]) for m in models]  # the same images for every checkpoint
    stats = {label: analysis.curvature_stats(m, loader, top=args.top, limit=args.max_images)
             for label, m, loader in zip(labels, models, loaders)}
    figure = analysis.plot_curvature(stats, _out(args, "curvature.png"))
    result = {label: analysis.curvature_summary(s) for label, s in stats.items()}
    for label, summary in result.items():
        _report(f"Gaussian curvature of {label}'s top channels on {loaders[0].source} [{args.split}]", summary)
    return {"checkpoints": result, "figure": str(figure)}


def _study(args, command: str, study, title: str) -> dict:
    """An ``analysis`` study of one checkpoint over its data, reported; ``title`` may use {source}."""
    model = load_checked(args.weights, command)
    loader = _loader(args, model)
    result = study(model, loader, limit=args.max_images, out=_out(args))
    _report(f"{title.format(source=loader.source)} [{args.split}]", result)
    return result


def cmd_embedding(args) -> dict:
    return _study(args, "embedding", analysis.embedding_study, "Embedding space on {source}")


def cmd_pde(args) -> dict:
    return _study(args, "pde", analysis.pde_study, "Eq. 2 and Eq. 4 on the maps of {source} (relative residuals: "
                                                   "0 = exact)")


def cmd_rate_distortion(args) -> dict:
    model = load_checked(args.weights, "rate-distortion")
    loader = _loader(args, model)
    result = codec.rate_distortion(model, loader, limit=args.max_images)
    title = f"Rate-distortion on {loader.source} [{args.split}], {result['images']} images"
    console.print(codec.rate_distortion_table(result, title=escape(title)))
    result["figure"] = str(codec.plot_rate_distortion(result, _out(args, "rate_distortion.png")))
    return result


def cmd_encode(args) -> dict:
    image = codec.read_image(args.image)  # a missing or non-image file fails before the model loads
    model = load_checked(args.weights, "encode")
    x = reconstruct_transform(model)(image)[None]
    q = codec.encode(model, x)
    path = codec.save_q(args.output or Path(f"{args.image}.q"), q[0], identity=codec.model_identity(model),
                        weights=args.weights)
    result = {"q_file": str(path), "file_bytes": path.stat().st_size, "payload_bytes": 2 * q.shape[1],
              "psnr_db": psnr(x, codec.decode(model, q)).item()}
    _report(f"{args.image} encoded", result)
    return result


def cmd_decode(args) -> dict:
    model = load_checked(args.weights, "decode")
    q = codec.load_q(args.qfile, identity=codec.model_identity(model))
    path = args.output or args.qfile.with_suffix(".png")
    analysis.save_image(codec.to_pil(codec.decode(model, q[None])[0]), path)
    result = {"image": str(path), "size": list(model.image_size)}
    _report(f"{args.qfile} decoded", result)
    return result


def cmd_curves(args) -> dict:
    return runs.report(args.runs, labels=args.labels, out=args.out and args.out / "curves.png", console=console)


def cmd_export(args) -> dict:
    out = weights.export(args.weights, args.out)
    console.print(f"{out}: model.safetensors + README.md; upload: huggingface-cli upload ORG/REPO {escape(str(out))}")
    return {"folder": str(out), "files": ["model.safetensors", "README.md"]}


COMMANDS = {"reconstruct": cmd_reconstruct, "detect": cmd_detect, "masked": cmd_masked, "mae": cmd_mae,
            "classify": cmd_classify,
            "curvature": cmd_curvature, "embedding": cmd_embedding, "pde": cmd_pde,
            "rate-distortion": cmd_rate_distortion, "encode": cmd_encode, "decode": cmd_decode, "curves": cmd_curves,
            "export": cmd_export}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    one = argparse.ArgumentParser(add_help=False)  # one --weights file
    one.add_argument("--weights", required=True, help="a model.safetensors of ours (or hf:ORG/REPO[/FILE])")
    evaluated = argparse.ArgumentParser(add_help=False)  # the data and figures of every evaluation
    evaluated.add_argument("--data", help="source (default: the data the (first) weights were trained on)")
    evaluated.add_argument("--split", default="validation")
    evaluated.add_argument("--batch-size", type=int, default=32)
    evaluated.add_argument("--out", type=Path, help="folder for the PNG figures (default: the (first) weights' folder)")
    analysed = argparse.ArgumentParser(add_help=False)
    analysed.add_argument("--max-images", type=int, help="use at most this many images (default: all)")
    sized = argparse.ArgumentParser(add_help=False)
    sized.add_argument("--image-size", type=int, help="network input side (default: the training image size)")
    r = sub.add_parser("reconstruct", parents=[one, evaluated], help="PSNR of a FINOLA model against baselines, and a "
                                                                    "PNG of originals above reconstructions")
    r.add_argument("--pca-images", type=int, default=20000,
                   help="training crops for the PCA baseline with k = C components (0 skips it)")
    sub.add_parser("detect", parents=[one, evaluated, sized], help="COCO AP of a DETR model, and a PNG of true (green) "
                                                                 "and predicted (red) boxes")
    sub.add_parser("masked", parents=[one, evaluated], help="masked-region PSNR of a masked FINOLA model (centred "
                                                           "block), and a PNG")
    sub.add_parser("mae", parents=[one, evaluated, sized], help="MAE's loss on removed patches (fixed draw), and a PNG")
    sub.add_parser("classify", parents=[one, evaluated, sized], help="top-1 / top-5 accuracy of a classifier")
    c = sub.add_parser("curvature", parents=[evaluated, analysed], help="Gaussian curvature of critical channels "
                                                                       "(Fig. 5)")
    c.add_argument("--weights", nargs="+", required=True, help="one or more model.safetensors, overlaid")
    c.add_argument("--labels", nargs="+", help="one name per --weights file (default: their folders' names)")
    c.add_argument("--top", type=int, default=16, help="channels ranked per image (the top-K of Fig. 5)")
    for name, what in (("embedding", "the space of q (App. E.2), five PNGs"), ("pde", "Eq. 2 and Eq. 4 (App. A)"),
                       ("rate-distortion", "q (float16, 8-bit) against JPEG at matched bytes, table and PNG")):
        sub.add_parser(name, parents=[one, evaluated, analysed], help=what)
    e = sub.add_parser("encode", parents=[one], help="an image to a .q file (q in float16)")
    e.add_argument("image", type=Path)
    e.add_argument("-o", "--output", type=Path, help="the .q file (default: IMAGE.q)")
    de = sub.add_parser("decode", parents=[one], help="a .q file back to a PNG, by the model that encoded it")
    de.add_argument("qfile", type=Path)
    de.add_argument("-o", "--output", type=Path, help="the PNG (default: QFILE with the suffix .png)")
    cu = sub.add_parser("curves", help="loss, lr, img/s and the final metrics of runs against step (PNG, table)")
    cu.add_argument("runs", nargs="+", help="run folders of train.py (or their metrics.jsonl), overlaid")
    cu.add_argument("--labels", nargs="+", help="one name per run (default: the folders' names)")
    cu.add_argument("--out", type=Path, help="folder for curves.png (default: the first run's folder)")
    ex = sub.add_parser("export", parents=[one], help="a folder for the hub: model.safetensors and its model card")
    ex.add_argument("--out", type=Path, required=True, help="the folder to write")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    args.bad = data.BadImages()  # every loader of the command counts its unreadable images here
    result = COMMANDS[args.command](args)
    if args.bad.total():
        console.print(args.bad.report())
    print(json.dumps({k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in result.items()}))
    return result


if __name__ == "__main__":
    import errors

    errors.run(main)
