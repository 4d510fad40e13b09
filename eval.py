"""Metrics and evaluations of our checkpoints: ``python eval.py COMMAND --weights FILE ...``.

Every command prints a rich table and ends with exactly one line of JSON holding its figures. Importing this module
does no work, so its functions serve notebooks and tests.

    reconstruct   PSNR of FINOLA reconstructions next to two baselines, and a PNG grid (§4, Table 2)
    detect        COCO AP of a DETR model through pycocotools' COCOeval, and a PNG of boxes (Tables 4, 18)
"""
from __future__ import annotations

import argparse
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
from pycocotools.cocoeval import COCOeval
from rich.table import Table

import data
import weights

console = Console(stderr=True)


# ---------------------------------------------------------------------------------------------------------------------
# Reconstruction (§4): PSNR and its baselines
# ---------------------------------------------------------------------------------------------------------------------

def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of images in [0, 1], (B, 3, H, W) -> (B,): 10 log10(1 / MSE); y is clamped to [0, 1]."""
    mse = (x - y.clamp(0, 1)).square().flatten(1).mean(1)
    return 10 * torch.log10(1 / mse.clamp_min(1e-12))


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


@torch.no_grad()
def reconstruct(model, loader, *, grid: Path | None = None, show: int = 8) -> dict:
    """Mean per-image PSNR of ``model``'s reconstructions over ``loader``, next to the mean-colour and bilinear
    baselines on the same images; optionally a PNG of originals (top row) above reconstructions (bottom row).
    A model with ``norm="moving-average"`` is scored with its running statistics (``psnr_db``) and with the
    per-position normalisation it trained with (``psnr_layer_norm_db``), §4's "Is normalization necessary?"."""
    model.eval()
    moving = getattr(model.config, "norm", "layer") == "moving-average"
    scores = {"psnr_db": [], "mean_colour_db": [], "bilinear_db": []} | ({"psnr_layer_norm_db": []} if moving else {})
    shown = []
    for batch in loader:
        x = batch["images"]
        y = model(x)
        scores["psnr_db"].append(psnr(x, y))
        if moving:  # §4's ablation: the same model normalising per position, as it did in training
            model.use_running_stats = False
            scores["psnr_layer_norm_db"].append(psnr(x, model(x)))
            model.use_running_stats = True
        scores["mean_colour_db"].append(psnr(x, mean_colour(x)))
        scores["bilinear_db"].append(psnr(x, bilinear(x, model.config.grid)))
        if len(shown) < show:
            shown += list(zip(x, y))[: show - len(shown)]
    if not scores["psnr_db"]:
        raise ValueError("reconstruct: the data gave no images")
    out = {k: round(torch.cat(v).mean().item(), 3) for k, v in scores.items()}
    out["images"] = len(torch.cat(scores["psnr_db"]))
    if grid is not None:
        save_grid([torch.stack([a for a, _ in shown]), torch.stack([b for _, b in shown])], grid)
    return out


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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((canvas.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(path)
    return path


# ---------------------------------------------------------------------------------------------------------------------
# Detection (Tables 4, 18): COCO AP
# ---------------------------------------------------------------------------------------------------------------------

AP_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


@torch.no_grad()
def detect(model, loader, coco_gt, *, figure: Path | None = None, show: int = 6, threshold: float = 0.5) -> dict:
    """COCO box AP of a DETR model over ``loader`` against ``coco_gt`` (``data.coco(dataset)``), with
    pycocotools' COCOeval; optionally a PNG of ``show`` images with true (green) and predicted (red, score >=
    ``threshold``) boxes."""
    import detr  # only this evaluation needs it

    model.eval()
    results, shown = [], []
    for batch in loader:
        targets = batch["targets"]
        outputs = model(batch["images"])
        dets = detr.postprocess(outputs, [t["orig_size"] for t in targets], image_ids=[t["image_id"] for t in targets])
        results += dets
        q = outputs["pred_logits"].shape[1]
        for i in range(min(len(targets), show - len(shown))):
            shown.append((batch["images"][i], targets[i], dets[i * q:(i + 1) * q]))
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
    return save_grid([torch.stack(tiles)], path)


# ---------------------------------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------------------------------

def _default_data(meta: dict, source: str | None) -> tuple[str, dict]:
    """The data to evaluate on: --data, or what the weights were trained on (from the file's metadata)."""
    options = meta["train"].get("data_options", {}) if source is None else {}
    source = source or meta.get("data")
    if not source:
        raise ValueError("--data: the weights' metadata names no training data; pass --data SOURCE")
    return source, options


def _load(args, arch: str, command: str, tasks: str):
    """The model of --weights, which must be an ``arch`` model, and the data to evaluate it on."""
    model = weights.load_model(args.weights)
    if model.metadata["model"]["arch"] != arch:
        raise ValueError(f"--weights: {args.weights} holds a {model.metadata['model']['arch']!r} model; "
                         f"{command} needs a {arch!r} model (train.py --task {tasks})")
    return model, *_default_data(model.metadata, args.data)


def cmd_reconstruct(args) -> dict:
    model, source, options = _load(args, "finola", "reconstruct", "finola")
    ds = data.load(source, split=args.split, **options)
    loader = data.loader(ds, batch_size=args.batch_size, transform=reconstruct_transform(model))
    result = reconstruct(model, loader, grid=args.grid)
    table = Table(title=escape(f"Reconstruction PSNR on {source} [{args.split}], {result['images']} images"))
    columns = {"psnr_db": "model", "psnr_layer_norm_db": "model, per-position norm", "mean_colour_db": "mean colour",
               "bilinear_db": f"bilinear via {model.config.grid[0]}x{model.config.grid[1]}"}
    shown = [k for k in columns if k in result]
    for k in shown:
        table.add_column(columns[k], justify="right")
    table.add_row(*(f"{result[k]:.2f} dB" for k in shown))
    console.print(table)
    if args.grid:
        console.print(f"grid of originals (top) and reconstructions (bottom): {args.grid}")
    if data.BAD.total():
        console.print(data.BAD.report())
    return result


def cmd_detect(args) -> dict:
    model, source, options = _load(args, "detr", "detect", "detr-probe or detr-finetune")
    size = args.image_size or model.metadata["train"].get("image_size", 800)
    ds = data.load(source, split=args.split, **options)
    loader = data.loader(ds, batch_size=args.batch_size, transform=data.eval_transform("detect", size=size))
    result = detect(model, loader, data.coco(ds), figure=args.figure)
    table = Table(title=escape(f"COCO box AP on {source} [{args.split}], {result['images']} images at {size}x{size}"))
    for name in AP_NAMES:
        table.add_column(name, justify="right")
    table.add_row(*(f"{100 * result[k]:.1f}" if result[k] >= 0 else "-" for k in AP_NAMES))  # -1: no such boxes
    console.print(table)
    if args.figure:
        console.print(f"true (green) and predicted (red) boxes: {args.figure}")
    return result


COMMANDS = {"reconstruct": cmd_reconstruct, "detect": cmd_detect}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("reconstruct", help="PSNR of a FINOLA model against baselines, and a PNG grid")
    r.add_argument("--weights", required=True, help="a model.safetensors written by train.py --task finola")
    r.add_argument("--data", help="source (default: the data the weights were trained on)")
    r.add_argument("--split", default="validation")
    r.add_argument("--grid", type=Path, help="write a PNG of originals above reconstructions here")
    r.add_argument("--batch-size", type=int, default=32)
    d = sub.add_parser("detect", help="COCO AP of a DETR model, and a PNG of boxes")
    d.add_argument("--weights", required=True, help="a model.safetensors written by train.py --task detr-*")
    d.add_argument("--data", help="source (default: the data the weights were trained on)")
    d.add_argument("--split", default="validation")
    d.add_argument("--image-size", type=int, help="network input side (default: the training image size)")
    d.add_argument("--figure", type=Path, help="write a PNG of true and predicted boxes here")
    d.add_argument("--batch-size", type=int, default=16)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    result = COMMANDS[args.command](args)
    print(json.dumps({k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in result.items()}))
    return result


if __name__ == "__main__":
    main()
