"""Boxes for DETR (Carion et al., 2020): conversions, IoU and GIoU, the Hungarian matcher, the set criterion and the
post-processing to COCO results, as pure functions of predictions and targets; detr.py holds the network. Imports
torch and scipy only.

Predictions are normalized (cx, cy, w, h) in [0, 1] of each image's unpadded extent; targets are per image
{"labels": (n,) int64, "boxes": (n, 4) normalized cxcywh}.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn

# The class loss. DETR's softmax over K classes + no-object (weight 0.1) is the paper's. "focal" is Deformable DETR's:
# K sigmoids and the sigmoid focal loss (α = 0.25, γ = 2; weight 2, and the matching cost's class term alike), every
# class starting at probability 0.01; detections are then the top (query, class) pairs by score, not one a query.
CLASS_LOSSES = ("ce", "focal")
FOCAL_ALPHA, FOCAL_GAMMA = 0.25, 2.0


# ---------------------------------------------------------------------------------------------------------------
# Boxes: (cx, cy, w, h) <-> (x0, y0, x1, y1), generalised IoU
# ---------------------------------------------------------------------------------------------------------------
def box_cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)


def box_xyxy_to_cxcywh(boxes: torch.Tensor) -> torch.Tensor:
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)


def _intersection_union(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Intersection and union areas of broadcastable xyxy boxes."""
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    inter = ((torch.minimum(a[..., 2:], b[..., 2:]) - torch.maximum(a[..., :2], b[..., :2])).clamp(min=0)).prod(-1)
    return inter, area_a + area_b - inter


def _giou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Generalised IoU of broadcastable xyxy boxes: IoU − (enclosing − union) / enclosing (Rezatofighi et al.)."""
    inter, union = _intersection_union(a, b)
    enclosing = (torch.maximum(a[..., 2:], b[..., 2:]) - torch.minimum(a[..., :2], b[..., :2])).prod(-1)
    return inter / union - (enclosing - union) / enclosing


def _check_pairs(a: torch.Tensor, b: torch.Tensor):
    if a.dim() != 2 or b.dim() != 2 or a.shape[-1] != 4 or b.shape[-1] != 4:
        raise ValueError(f"a, b: expected (N, 4) and (M, 4) xyxy boxes, got {tuple(a.shape)} and {tuple(b.shape)}")


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU of xyxy boxes a (N, 4) and b (M, 4) → (N, M), in [0, 1]."""
    _check_pairs(a, b)
    inter, union = _intersection_union(a[:, None], b[None])
    return inter / union


def generalized_box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise GIoU of xyxy boxes a (N, 4) and b (M, 4) → (N, M), in [−1, 1]."""
    _check_pairs(a, b)
    return _giou(a[:, None], b[None])


# ---------------------------------------------------------------------------------------------------------------
# Hungarian matching (DETR §3.1)
# ---------------------------------------------------------------------------------------------------------------
def _check_targets(targets: list[dict], batch: int):
    if len(targets) != batch:
        raise ValueError(f"targets: expected {batch} dicts (one per image), got {len(targets)}")
    for i, t in enumerate(targets):
        if "labels" not in t or "boxes" not in t or t["boxes"].shape != (len(t["labels"]), 4):
            raise ValueError(f"targets[{i}]: need 'labels' (n,) and 'boxes' (n, 4) normalized cxcywh")


def _focal_class_cost(logits: torch.Tensor) -> torch.Tensor:
    """Deformable DETR's class cost per (prediction, class): the focal loss of calling it that class minus that of
    not calling it."""
    p = logits.sigmoid()
    positive = FOCAL_ALPHA * (1 - p) ** FOCAL_GAMMA * -(p + 1e-8).log()
    negative = (1 - FOCAL_ALPHA) * p ** FOCAL_GAMMA * -(1 - p + 1e-8).log()
    return positive - negative


@torch.no_grad()
def hungarian_match(pred_logits: torch.Tensor, pred_boxes: torch.Tensor, targets: list[dict], *,
                    cost_class: float = 1.0, cost_bbox: float = 5.0, cost_giou: float = 2.0,
                    focal: bool = False) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Optimal one-to-one assignment of predictions to targets, per image: cost = −cost_class·p(class)
    + cost_bbox·L1(cxcywh) − cost_giou·GIoU (``focal``: cost_class·``_focal_class_cost`` in place of −p(class)).
    pred_logits (B, Q, K+1) (``focal``: K), pred_boxes (B, Q, 4); targets: per image {"labels": (n,), "boxes":
    (n, 4) normalized cxcywh}. Returns per image (pred_indices, target_indices), int64, sorted by prediction,
    length min(Q, n)."""
    B, Q = pred_logits.shape[:2]
    _check_targets(targets, B)
    logits = pred_logits.flatten(0, 1)
    class_cost = _focal_class_cost(logits) if focal else -logits.softmax(-1)          # (B·Q, K(+1))
    boxes = pred_boxes.flatten(0, 1)
    labels = torch.cat([t["labels"] for t in targets]).to(logits.device, torch.int64)
    tgt = torch.cat([t["boxes"] for t in targets]).to(boxes)
    cost = (cost_bbox * torch.cdist(boxes, tgt, p=1) + cost_class * class_cost[:, labels]
            - cost_giou * generalized_box_iou(box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(tgt)))
    cost = cost.view(B, Q, -1).float().cpu()
    sizes = [len(t["labels"]) for t in targets]
    matches = [linear_sum_assignment(c[i]) for i, c in enumerate(cost.split(sizes, dim=-1))]
    return [(torch.as_tensor(p, dtype=torch.int64), torch.as_tensor(t, dtype=torch.int64)) for p, t in matches]


# ---------------------------------------------------------------------------------------------------------------
# Denoising queries (DN-DETR, Li et al., 2022): noised copies of the true boxes that learn to give them back
# ---------------------------------------------------------------------------------------------------------------
def noised_targets(targets: list[dict], *, groups: int, num_classes: int, box_noise: float = 0.4,
                   label_noise: float = 0.2) -> dict[str, torch.Tensor]:
    """DN-DETR's training queries: ``groups`` noised copies of every image's boxes, padded to E = groups · (the most
    boxes an image has). Each centre moves by up to ``box_noise`` · half its side and each side scales by up to
    1 ± ``box_noise`` (uniform), clipped to the image; each label becomes a random class with probability
    ``label_noise``. Returns {"labels_in", "boxes_in": the noised queries, "labels", "boxes": what they should
    predict, "valid" (B, E), "group" (E,)}."""
    b, n = len(targets), max((len(t["labels"]) for t in targets), default=0)
    device = targets[0]["boxes"].device if targets else None
    labels = torch.zeros(b, n, dtype=torch.int64, device=device)
    boxes, valid = torch.full((b, n, 4), 0.5, device=device), torch.zeros(b, n, dtype=torch.bool, device=device)
    for i, t in enumerate(targets):
        k = len(t["labels"])
        labels[i, :k], boxes[i, :k], valid[i, :k] = t["labels"], t["boxes"].float(), True
    labels, boxes, valid = labels.repeat(1, groups), boxes.repeat(1, groups, 1), valid.repeat(1, groups)
    spread = boxes[..., 2:].repeat(1, 1, 2) * torch.tensor([0.5, 0.5, 1.0, 1.0], device=device) * box_noise
    boxes_in = (boxes + (torch.rand_like(boxes) * 2 - 1) * spread).clamp(0, 1)
    flip = torch.rand(labels.shape, device=device) < label_noise
    labels_in = torch.where(flip, torch.randint_like(labels, num_classes), labels)
    return {"labels_in": labels_in, "boxes_in": boxes_in, "labels": labels, "boxes": boxes, "valid": valid,
            "group": torch.arange(groups, device=device).repeat_interleave(n)}


# ---------------------------------------------------------------------------------------------------------------
# Set criterion (DETR §3.1): CE with no-object weight 0.1, L1 ×5, GIoU ×2, on every decoder layer
# ---------------------------------------------------------------------------------------------------------------
def _global_num_boxes(targets: list[dict], device) -> float:
    """Boxes in the batch averaged over processes (all_reduce when torch.distributed is initialised), at least 1."""
    n = torch.tensor(float(sum(len(t["labels"]) for t in targets)), device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(n)
        n = n / dist.get_world_size()
    return max(n.item(), 1.0)


class SetCriterion(nn.Module):
    """`criterion(outputs, targets, num_boxes=None)` → {"loss": weighted sum over all layers, "loss_ce", "loss_bbox",
    "loss_giou": the last layer's unweighted terms}. L1 and GIoU are summed over matched boxes and divided by
    `num_boxes` (default: the batch's boxes averaged across processes). The class term "loss_ce": with `class_loss`
    "ce", cross-entropy averaged over all queries with class weights 1 and `eos_coef` for no-object; with "focal",
    the sigmoid focal loss summed over queries and classes and divided by `num_boxes` (Deformable DETR), weight and
    matching cost 2 unless given."""

    def __init__(self, num_classes: int, *, class_loss: str = "ce", eos_coef: float = 0.1,
                 weight_ce: float | None = None, weight_bbox: float = 5.0, weight_giou: float = 2.0,
                 cost_class: float | None = None, cost_bbox: float = 5.0, cost_giou: float = 2.0):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes: must be positive, got {num_classes}")
        if class_loss not in CLASS_LOSSES:
            raise ValueError(f"class_loss: expected one of {CLASS_LOSSES}, got {class_loss!r}")
        self.num_classes, self.focal = num_classes, class_loss == "focal"
        default = 2.0 if self.focal else 1.0
        self.weights = {"loss_ce": default if weight_ce is None else weight_ce, "loss_bbox": weight_bbox,
                        "loss_giou": weight_giou}
        self.costs = {"cost_class": default if cost_class is None else cost_class, "cost_bbox": cost_bbox,
                      "cost_giou": cost_giou}
        class_weight = torch.ones(num_classes + 1)
        class_weight[-1] = eos_coef
        self.register_buffer("class_weight", class_weight, persistent=False)

    @classmethod
    def for_model(cls, config) -> "SetCriterion":
        """The criterion a detector of this config (a ``detr.DETRConfig``) trains with."""
        return cls(config.num_classes, class_loss=config.class_loss)

    def class_term(self, logits: torch.Tensor, classes: torch.Tensor, num_boxes: float) -> torch.Tensor:
        """The class loss of logits (B, Q, ·) against each query's class (B, Q), ``num_classes`` = no object."""
        if not self.focal:
            return F.cross_entropy(logits.transpose(1, 2), classes, weight=self.class_weight.to(logits))
        target = F.one_hot(classes, self.num_classes + 1)[..., :-1].to(logits)      # no object: all zeros
        p = logits.sigmoid()
        p_true = p * target + (1 - p) * (1 - target)
        alpha = FOCAL_ALPHA * target + (1 - FOCAL_ALPHA) * (1 - target)
        loss = alpha * (1 - p_true) ** FOCAL_GAMMA * F.binary_cross_entropy_with_logits(logits, target,
                                                                                       reduction="none")
        return loss.sum() / num_boxes

    def layer_losses(self, logits: torch.Tensor, boxes: torch.Tensor, targets: list[dict],
                     num_boxes: float) -> dict[str, torch.Tensor]:
        """Unweighted class, L1 and GIoU terms of one decoder layer's outputs."""
        expected = self.num_classes + (not self.focal)
        if logits.shape[-1] != expected:
            raise ValueError(f"outputs: pred_logits has {logits.shape[-1]} classes, expected {expected} (num_classes"
                             f"{'' if self.focal else ' + 1 for no-object'})")
        indices = hungarian_match(logits, boxes, targets, focal=self.focal, **self.costs)
        batch = torch.cat([torch.full_like(p, i) for i, (p, _) in enumerate(indices)]).to(logits.device)
        query = torch.cat([p for p, _ in indices]).to(logits.device)
        labels = torch.cat([t["labels"][j.to(t["labels"].device)] for t, (_, j) in zip(targets, indices)])
        tgt = torch.cat([t["boxes"][j.to(t["boxes"].device)] for t, (_, j) in zip(targets, indices)]).to(boxes)
        classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device)
        classes[batch, query] = labels.to(logits.device, torch.int64)
        return self._terms(logits, classes, boxes[batch, query], tgt, num_boxes)

    def _terms(self, logits: torch.Tensor, classes: torch.Tensor, src: torch.Tensor, tgt: torch.Tensor,
               num_boxes: float) -> dict[str, torch.Tensor]:
        return {"loss_ce": self.class_term(logits, classes, num_boxes),
                "loss_bbox": F.l1_loss(src, tgt, reduction="sum") / num_boxes,
                "loss_giou": (1 - _giou(box_cxcywh_to_xyxy(src), box_cxcywh_to_xyxy(tgt))).sum() / num_boxes}

    def denoising_losses(self, logits: torch.Tensor, boxes: torch.Tensor, dn: dict,
                         num_boxes: float) -> dict[str, torch.Tensor]:
        """The terms of one layer's denoising queries against the true boxes they were noised from (no matching),
        over their valid entries, per box of every group."""
        valid, groups = dn["valid"], int(dn["group"].max()) + 1 if len(dn["group"]) else 1
        return self._terms(logits[valid][None], dn["labels"][valid][None], boxes[valid], dn["boxes"][valid].to(boxes),
                           num_boxes * groups)

    def forward(self, outputs: dict, targets: list[dict], *, num_boxes: float | None = None) -> dict:
        """With "dn_outputs" (DN-DETR), their terms are added to the loss with the same weights."""
        _check_targets(targets, outputs["pred_logits"].shape[0])
        if num_boxes is None:
            num_boxes = _global_num_boxes(targets, outputs["pred_logits"].device)
        layers = [*outputs.get("aux_outputs", []), outputs]
        total = 0.0
        for layer in layers:
            terms = self.layer_losses(layer["pred_logits"], layer["pred_boxes"], targets, num_boxes)
            total = total + sum(self.weights[k] * v for k, v in terms.items())
        for layer in outputs.get("dn_outputs", []):
            dn = self.denoising_losses(layer["pred_logits"], layer["pred_boxes"], outputs["dn_targets"], num_boxes)
            total = total + sum(self.weights[k] * v for k, v in dn.items())
        return {"loss": total, **terms}


# ---------------------------------------------------------------------------------------------------------------
# Post-processing to COCO results
# ---------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def postprocess(outputs: dict, orig_sizes, *, image_ids, category_ids=None, class_loss: str = "ce",
                top: int = 100) -> list[dict]:
    """COCO result dicts {"image_id", "category_id", "bbox": [x, y, w, h] in pixels, "score"}, image by image.
    ``class_loss`` "ce" (the detector's config says which): one per query (as DETR submits), scored by the best real
    class of the softmax (no-object excluded); "focal": the ``top`` (query, class) pairs of each image by sigmoid
    score (Deformable DETR). `orig_sizes` (B, 2) is (height, width) of the original images, the extent the
    normalized boxes span; `category_ids[k]` is the COCO id of contiguous label k (default: the label itself)."""
    logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
    B, Q = logits.shape[:2]
    sizes = torch.as_tensor(orig_sizes, dtype=torch.float32).to(boxes.device)
    ids = torch.as_tensor(image_ids, dtype=torch.int64)
    if sizes.shape != (B, 2) or ids.shape != (B,):
        raise ValueError(f"orig_sizes, image_ids: expected ({B}, 2) and ({B},), got {tuple(sizes.shape)} "
                         f"and {tuple(ids.shape)}")
    if class_loss not in CLASS_LOSSES:
        raise ValueError(f"class_loss: expected one of {CLASS_LOSSES}, got {class_loss!r}")
    xyxy = box_cxcywh_to_xyxy(boxes.float()) * sizes.flip(-1).repeat(1, 2)[:, None]   # (w, h, w, h) per image
    xywh = torch.cat([xyxy[..., :2], xyxy[..., 2:] - xyxy[..., :2]], dim=-1)
    if class_loss == "ce":
        scores, labels = logits.softmax(-1)[..., :-1].max(-1)                          # (B, Q)
    else:
        k = logits.shape[-1]
        scores, pairs = logits.sigmoid().flatten(1).topk(min(top, Q * k), dim=1)        # (B, n) each
        labels, xywh = pairs % k, xywh.gather(1, (pairs // k)[..., None].expand(-1, -1, 4))
    num_classes = logits.shape[-1] - (class_loss == "ce")
    if category_ids is not None:
        category_ids = torch.as_tensor(category_ids, dtype=torch.int64)
        if len(category_ids) != num_classes:
            raise ValueError(f"category_ids: need one COCO id per class ({num_classes}), got {len(category_ids)}")
        labels = category_ids.to(labels.device)[labels]
    n = labels.shape[1]
    return [{"image_id": i, "category_id": c, "bbox": b, "score": s}
            for i, c, b, s in zip(ids[:, None].expand(B, n).flatten().tolist(), labels.flatten().tolist(),
                                  xywh.flatten(0, 1).tolist(), scores.flatten().tolist())]
