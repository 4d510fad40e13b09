"""A linear box probe of a frozen encoder (ours, beside Table 4's DETR probe): can a linear read-out of an object's
box on the encoder's maps tell its class, and an object from a box of the same size elsewhere?

DETR's set prediction learns for hundreds of epochs (the paper's probe: 500) before its AP says anything; this asks
the frozen encoder's 1/8 and 1/16 maps the same question in seconds (``box_probe``).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

import augment
import data
import detection
import layers
import mobileformer
import weights


def background_boxes(boxes: torch.Tensor, generator: torch.Generator, *, tries: int = 16,
                     max_iou: float = 0.3) -> torch.Tensor:
    """For each normalized cxcywh box, one box of its size at a random place inside the image whose IoU with every
    box is below ``max_iou`` (boxes that find no such place within ``tries`` draws are left out)."""
    n = len(boxes)
    wh = boxes[:, None, 2:].expand(n, tries, 2)
    centres = wh / 2 + torch.rand(n, tries, 2, generator=generator) * (1 - wh).clamp(min=0)
    candidates = torch.cat([centres, wh], -1).reshape(-1, 4)
    iou = detection.box_iou(detection.box_cxcywh_to_xyxy(candidates), detection.box_cxcywh_to_xyxy(boxes)).amax(1).reshape(n, tries)
    free = iou < max_iou
    found = free.any(1)
    return candidates.reshape(n, tries, 4)[found, free[found].float().argmax(1)]


def box_features(encoder, dataset, *, size: int, background: bool, seed: int = 0,
                 batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """(features (N, F), labels (N,)) of every ground-truth box of ``dataset`` on the frozen ``encoder``'s 1/8 and
    1/16 maps (images resized as DETR's evaluation, shorter side ``size``): per map the mean and the max over the
    box's cells and the cell at its centre. ``background``: every object adds a box of its size elsewhere
    (``background_boxes``), labelled K (the number of classes)."""
    generator, norm = torch.Generator().manual_seed(seed), layers.PixelNorm()
    k = max(data.categories(dataset)) + 1
    encoder.eval()
    feats, labels = [], []
    for batch in data.Loader(dataset, batch_size=batch_size, transform=augment.eval_transform("detect", size=size)):
        with torch.no_grad():
            maps = encoder.forward_features(norm(batch["images"]), batch.get("mask"))
        for i, t in enumerate(batch["targets"]):
            boxes, labs = t["boxes"], t["labels"]
            if background and len(boxes):
                extra = background_boxes(boxes, generator)
                boxes, labs = torch.cat([boxes, extra]), torch.cat([labs, torch.full((len(extra),), k)])
            grids = []  # each map of this image and its own (unpadded) cells
            for name in ("stride8", "features"):
                f = maps[name][i]
                grids.append((f, math.ceil(t["size"][0] * f.shape[1] / batch["images"].shape[2]),
                              math.ceil(t["size"][1] * f.shape[2] / batch["images"].shape[3])))
            for (cx, cy, bw, bh), label in zip(boxes.tolist(), labs.tolist()):
                parts = []
                for f, h, w in grids:
                    x0, y0 = min(int((cx - bw / 2) * w), w - 1), min(int((cy - bh / 2) * h), h - 1)
                    x1, y1 = max(x0 + 1, math.ceil((cx + bw / 2) * w)), max(y0 + 1, math.ceil((cy + bh / 2) * h))
                    cells = f[:, y0:y1, x0:x1]
                    centre = f[:, min(int(cy * h), h - 1), min(int(cx * w), w - 1)]
                    parts += [cells.mean((1, 2)), cells.amax((1, 2)), centre]
                feats.append(torch.cat(parts))
                labels.append(label)
    return torch.stack(feats), torch.tensor(labels)


def linear_probe(train: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor], *,
                 l2: float = 1e-3) -> dict:
    """Multinomial logistic regression on standardized features (L-BFGS from zero, so deterministic) →
    {"train_acc", "val_acc", "train_n", "val_n"}."""
    (xt, yt), (xv, yv) = train, val
    mean, std = xt.mean(0), xt.std(0) + 1e-5
    xt, xv = (xt - mean) / std, (xv - mean) / std
    classes = int(max(yt.max(), yv.max())) + 1
    w = torch.zeros(xt.shape[1] + 1, classes, requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=500, line_search_fn="strong_wolfe")
    logits = lambda x: x @ w[:-1] + w[-1]  # noqa: E731

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits(xt), yt) + l2 * w[:-1].pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        acc = lambda x, y: (logits(x).argmax(1) == y).float().mean().item()  # noqa: E731
        return {"train_acc": acc(xt, yt), "val_acc": acc(xv, yv), "train_n": len(yt), "val_n": len(yv)}


def box_probe(encoder_weights: Path | None, source: str, *, size: int, seed: int, encoder: str = "mf-tiny") -> dict:
    """``linear_probe`` of ``box_features`` (with background boxes) of ``source``'s train / validation splits on a
    frozen encoder: ``encoder_weights``' or, for None, a random ``encoder`` (a Mobile-Former preset) seeded by
    ``seed``."""
    torch.manual_seed(seed)
    encoder = mobileformer.create(encoder) if encoder_weights is None else weights.load_encoder(encoder_weights)
    splits = [box_features(encoder, data.load(source, split=split), size=size, background=True, seed=seed)
              for split in ("train", "validation")]
    return {"final": linear_probe(*splits)}
