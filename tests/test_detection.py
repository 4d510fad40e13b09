"""detection.py: box ops, IoU / GIoU, the Hungarian matcher, the set criterion, COCO post-processing."""
import contextlib
import io
import itertools

import pytest
import torch
from torch.testing import assert_close

import detection


def _boxes(g, n):
    """n random normalized cxcywh boxes well inside the image."""
    c = 0.2 + 0.6 * torch.rand(n, 2, generator=g)
    return torch.cat([c, 0.05 + 0.3 * torch.rand(n, 2, generator=g)], dim=1)


def _targets(g, sizes, num_classes):
    return [{"labels": torch.randint(num_classes, (n,), generator=g), "boxes": _boxes(g, n)} for n in sizes]


# --- boxes ---------------------------------------------------------------------------------------------------------
def test_box_conversions_round_trip():
    g = torch.Generator().manual_seed(0)
    b = _boxes(g, 64)
    assert_close(detection.box_xyxy_to_cxcywh(detection.box_cxcywh_to_xyxy(b)), b)
    xyxy = detection.box_cxcywh_to_xyxy(b)
    assert_close(detection.box_cxcywh_to_xyxy(detection.box_xyxy_to_cxcywh(xyxy)), xyxy)
    assert_close(detection.box_cxcywh_to_xyxy(torch.tensor([0.5, 0.5, 0.2, 0.4])), torch.tensor([0.4, 0.3, 0.6, 0.7]))


@pytest.mark.parametrize("a, b, expected", [
    ([0, 0, 1, 1], [0, 0, 1, 1], 1.0),                        # identical
    ([0, 0, 1, 1], [2, 0, 3, 1], -1 / 3),                     # disjoint: 0 − (3 − 2) / 3
    ([0, 0, 2, 2], [0.5, 0.5, 1.5, 1.5], 0.25),               # nested: IoU 1/4, enclosing = union
    ([0, 0, 1, 1], [1, 0, 2, 1], 0.0),                        # touching edges: IoU 0, enclosing = union
    ([0, 0, 2, 2], [1, 1, 3, 3], 1 / 7 - 2 / 9),              # overlap: inter 1, union 7, enclosing 9
])
def test_giou_hand_values(a, b, expected):
    a, b = torch.tensor([a], dtype=torch.float64), torch.tensor([b], dtype=torch.float64)
    assert_close(detection.generalized_box_iou(a, b), torch.tensor([[expected]], dtype=torch.float64))
    assert_close(detection.generalized_box_iou(b, a), torch.tensor([[expected]], dtype=torch.float64))


@pytest.mark.parametrize("a, b, expected", [
    ([0, 0, 1, 1], [0, 0, 1, 1], 1.0), ([0, 0, 1, 1], [2, 0, 3, 1], 0.0), ([0, 0, 2, 2], [0.5, 0.5, 1.5, 1.5], 0.25),
    ([0, 0, 2, 2], [1, 1, 3, 3], 1 / 7)])
def test_iou_hand_values(a, b, expected):
    a, b = torch.tensor([a], dtype=torch.float64), torch.tensor([b], dtype=torch.float64)
    assert_close(detection.box_iou(a, b), torch.tensor([[expected]], dtype=torch.float64))
    assert_close(detection.box_iou(b, a), torch.tensor([[expected]], dtype=torch.float64))


def test_giou_pairwise_shape_and_symmetry():
    g = torch.Generator().manual_seed(1)
    a, b = detection.box_cxcywh_to_xyxy(_boxes(g, 4)), detection.box_cxcywh_to_xyxy(_boxes(g, 6))
    m = detection.generalized_box_iou(a, b)
    assert m.shape == (4, 6) and bool(((m >= -1) & (m <= 1)).all())
    assert_close(m, detection.generalized_box_iou(b, a).T)
    assert_close(detection.generalized_box_iou(a, a).diagonal(), torch.ones(4))
    with pytest.raises(ValueError, match="a, b"):
        detection.generalized_box_iou(a[0], b)


# --- matcher -------------------------------------------------------------------------------------------------------
def _cost_matrix(logits, boxes, t):
    """DETR's matching cost for one image, written out directly: (Q, n)."""
    prob = logits.softmax(-1)[:, t["labels"]]
    l1 = (boxes[:, None] - t["boxes"][None]).abs().sum(-1)
    giou = detection.generalized_box_iou(detection.box_cxcywh_to_xyxy(boxes), detection.box_cxcywh_to_xyxy(t["boxes"]))
    return -1.0 * prob + 5.0 * l1 - 2.0 * giou


def test_matcher_cost_equals_brute_force_minimum():
    g = torch.Generator().manual_seed(2)
    Q, K = 5, 3
    for n in [1, 2, 3, 4, 5, 2, 4]:
        logits, boxes = torch.randn(1, Q, K + 1, generator=g), _boxes(g, Q)[None]
        targets = _targets(g, [n], K)
        (p, t), = detection.hungarian_match(logits, boxes, targets)
        cost = _cost_matrix(logits[0], boxes[0], targets[0])
        assert len(p) == len(t) == n and len(set(p.tolist())) == n and sorted(t.tolist()) == list(range(n))
        best = min(sum(cost[q, j] for j, q in enumerate(perm)) for perm in itertools.permutations(range(Q), n))
        assert_close(cost[p, t].sum(), best)


def test_matcher_batched_equals_per_image_and_empty_targets():
    g = torch.Generator().manual_seed(3)
    sizes = [3, 0, 5, 1]
    logits, boxes = torch.randn(4, 8, 6, generator=g), torch.stack([_boxes(g, 8) for _ in sizes])
    targets = _targets(g, sizes, 5)
    batched = detection.hungarian_match(logits, boxes, targets)
    for i, (p, t) in enumerate(batched):
        (p1, t1), = detection.hungarian_match(logits[i:i + 1], boxes[i:i + 1], targets[i:i + 1])
        assert torch.equal(p, p1) and torch.equal(t, t1) and len(p) == sizes[i]
        assert p.dtype == t.dtype == torch.int64
    empty = detection.hungarian_match(logits[:2], boxes[:2], _targets(g, [0, 0], 5))
    assert all(p.numel() == 0 and t.numel() == 0 for p, t in empty)
    with pytest.raises(ValueError, match="targets"):
        detection.hungarian_match(logits, boxes, targets[:2])


# --- criterion -----------------------------------------------------------------------------------------------------
def _outputs(g, B, Q, K, layers):
    raw = [(torch.randn(B, Q, K + 1, generator=g).requires_grad_(), torch.randn(B, Q, 4, generator=g).requires_grad_())
           for _ in range(layers)]
    outs = [{"pred_logits": lg, "pred_boxes": bx.sigmoid()} for lg, bx in raw]
    return {**outs[-1], "aux_outputs": outs[:-1]}, raw


def test_criterion_gradient_reaches_logits_and_boxes_of_every_layer():
    g = torch.Generator().manual_seed(4)
    outputs, raw = _outputs(g, 2, 6, 4, layers=3)
    losses = detection.SetCriterion(4)(outputs, _targets(g, [2, 3], 4))
    assert set(losses) == {"loss", "loss_ce", "loss_bbox", "loss_giou"}
    losses["loss"].backward()
    for logits, boxes in raw:
        for x in (logits, boxes):
            assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_criterion_values_and_normalization():
    """Perfect boxes give zero L1 and GIoU; L1/GIoU scale with 1/num_boxes; CE weights no-object by 0.1."""
    K, Q = 3, 4
    targets = [{"labels": torch.tensor([2]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}]
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2]] + [[0.2, 0.2, 0.1, 0.1]] * (Q - 1)])
    logits = torch.zeros(1, Q, K + 1)
    crit = detection.SetCriterion(K)
    out = crit({"pred_logits": logits, "pred_boxes": boxes}, targets)
    assert_close(out["loss_bbox"], torch.tensor(0.0))
    assert_close(out["loss_giou"], torch.tensor(0.0))
    # uniform logits: CE = log(K+1) for every query, weighted mean over queries is the same
    assert_close(out["loss_ce"], torch.log(torch.tensor(K + 1.0)))
    shifted = boxes.clone()
    shifted[0, 0, 0] += 0.1
    a = crit({"pred_logits": logits, "pred_boxes": shifted}, targets)
    b = crit({"pred_logits": logits, "pred_boxes": shifted}, targets, num_boxes=2.0)
    assert_close(a["loss_bbox"], torch.tensor(0.1))
    assert_close(b["loss_bbox"], torch.tensor(0.05))
    assert_close(b["loss_giou"], a["loss_giou"] / 2)
    # no-object weight: confident no-object everywhere except the matched query costs little per no-object query
    logits2 = torch.zeros(1, Q, K + 1)
    logits2[0, 1:, 1] = 5.0                                      # wrong class on the 3 unmatched queries
    ce = crit({"pred_logits": logits2, "pred_boxes": boxes}, targets)["loss_ce"]
    per_query = torch.nn.functional.cross_entropy(logits2[0], torch.tensor([2, K, K, K]), reduction="none")
    assert_close(ce, (per_query[0] + 0.1 * per_query[1:].sum()) / (1 + 0.1 * (Q - 1)))
    empty = crit({"pred_logits": logits, "pred_boxes": boxes}, [{"labels": torch.zeros(0, dtype=torch.int64),
                                                                 "boxes": torch.zeros(0, 4)}])
    assert torch.isfinite(empty["loss"]) and empty["loss_bbox"] == 0


# --- post-processing and COCOeval ----------------------------------------------------------------------------------
def test_postprocess_pixels_scores_and_category_map():
    logits = torch.tensor([[[2.0, 0.0, 1.0]]])                   # 2 classes + no-object
    boxes = torch.tensor([[[0.5, 0.5, 0.5, 0.5]]])
    res = detection.postprocess({"pred_logits": logits, "pred_boxes": boxes}, torch.tensor([[100, 200]]),
                           image_ids=[7], category_ids=[3, 9])
    score = logits.softmax(-1)[0, 0, 0].item()
    assert len(res) == 1 and res[0]["image_id"] == 7 and res[0]["category_id"] == 3
    assert res[0]["bbox"] == pytest.approx([50.0, 25.0, 100.0, 50.0]) and res[0]["score"] == pytest.approx(score)
    with pytest.raises(ValueError, match="category_ids"):
        detection.postprocess({"pred_logits": logits, "pred_boxes": boxes}, [[100, 200]], image_ids=[7], category_ids=[3])


def test_postprocess_focal_keeps_the_top_query_class_pairs():
    logits = torch.tensor([[[3.0, -1.0], [0.0, 2.0], [-4.0, -5.0]]])    # 3 queries, 2 classes, sigmoid scores
    boxes = torch.tensor([[[0.5, 0.5, 0.5, 0.5], [0.25, 0.25, 0.5, 0.5], [0.1, 0.1, 0.1, 0.1]]])
    res = detection.postprocess({"pred_logits": logits, "pred_boxes": boxes}, [[100, 200]], image_ids=[7],
                           category_ids=[3, 9], class_loss="focal", top=3)
    assert [(r["category_id"], r["score"]) for r in res] == [
        (3, pytest.approx(torch.tensor(3.0).sigmoid().item())), (9, pytest.approx(torch.tensor(2.0).sigmoid().item())),
        (3, 0.5)]                                                    # query 1's class 0 (logit 0) before query 0's 1
    assert res[0]["bbox"] == pytest.approx([50.0, 25.0, 100.0, 50.0]) and res[1]["bbox"] == pytest.approx(
        [0.0, 0.0, 100.0, 50.0]) and res[2]["bbox"] == pytest.approx([0.0, 0.0, 100.0, 50.0])
    assert len(detection.postprocess({"pred_logits": logits, "pred_boxes": boxes}, [[100, 200]], image_ids=[7],
                                class_loss="focal")) == 6            # at most 100, at most every pair


def test_focal_class_term_equals_the_formula_written_out():
    """Deformable DETR's sigmoid focal loss, one (query, class) at a time: −α (1 − p)^γ log p for the matched
    query's class, −(1 − α) p^γ log(1 − p) for every other pair, summed, over the number of boxes."""
    g = torch.Generator().manual_seed(6)
    K, Q = 3, 4
    logits = torch.randn(1, Q, K, generator=g, dtype=torch.float64)
    classes = torch.tensor([[2, K, 0, K]])                          # queries 0 and 2 matched, others no object
    crit = detection.SetCriterion(K, class_loss="focal")
    expected = 0.0
    for q in range(Q):
        for k in range(K):
            p = logits[0, q, k].sigmoid()
            expected += (-0.25 * (1 - p) ** 2 * p.log() if classes[0, q] == k else -0.75 * p ** 2 * (1 - p).log())
    assert_close(crit.class_term(logits, classes, num_boxes=2.0), expected / 2)
    assert crit.weights["loss_ce"] == 2.0 and crit.costs["cost_class"] == 2.0
    with pytest.raises(ValueError, match="class_loss"):
        detection.SetCriterion(K, class_loss="hinge")


def test_focal_matching_prefers_the_confident_query():
    """With equal boxes, the query whose sigmoid calls the target's class gets it."""
    logits = torch.tensor([[[-3.0, -3.0], [-3.0, 3.0]]])
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2]] * 2])
    (p, t), = detection.hungarian_match(logits, boxes, [{"labels": torch.tensor([1]), "boxes": boxes[0, :1]}], focal=True)
    assert p.tolist() == [1] and t.tolist() == [0]


def _coco_eval(gt: dict, results: list[dict]) -> float:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = gt
        coco.createIndex()
        ev = COCOeval(coco, coco.loadRes(results), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats[0]


def test_cocoeval_perfect_predictions_give_ap_one():
    cats = [1, 3, 7]                                             # COCO ids; contiguous labels 0, 1, 2
    images = [{"id": 11, "height": 480, "width": 640}, {"id": 12, "height": 200, "width": 300}]
    boxes = {11: [(0, [10, 20, 100, 50]), (2, [300, 200, 200, 150]), (1, [50, 300, 60, 120])],
             12: [(2, [0, 0, 150, 100]), (0, [120, 60, 90, 90])]}
    anns = [{"id": k + 1, "image_id": i, "category_id": cats[lbl], "bbox": bb, "area": bb[2] * bb[3], "iscrowd": 0}
            for k, (i, lbl, bb) in enumerate((i, lbl, bb) for i, lst in boxes.items() for lbl, bb in lst)]
    gt = {"images": images, "annotations": anns, "categories": [{"id": c, "name": str(c)} for c in cats]}
    Q, K = 10, len(cats)
    logits = torch.zeros(2, Q, K + 1)
    logits[..., K] = 8.0                                         # unmatched queries: confident no-object
    pred = torch.tensor([0.5, 0.5, 0.1, 0.1]).repeat(2, Q, 1)
    sizes = torch.tensor([[im["height"], im["width"]] for im in images])
    for b, im in enumerate(images):
        for q, (lbl, (x, y, w, h)) in enumerate(boxes[im["id"]]):
            W, H = im["width"], im["height"]
            pred[b, q] = torch.tensor([(x + w / 2) / W, (y + h / 2) / H, w / W, h / H])
            logits[b, q, lbl] = 10.0
    outputs = {"pred_logits": logits, "pred_boxes": pred}
    results = detection.postprocess(outputs, sizes, image_ids=[11, 12], category_ids=cats)
    assert len(results) == 2 * Q
    assert _coco_eval(gt, results) == pytest.approx(1.0)
    wrong = detection.postprocess(outputs, sizes, image_ids=[11, 12], category_ids=[3, 7, 1])   # labels mapped wrongly
    assert _coco_eval(gt, wrong) < 0.1
