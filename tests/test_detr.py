"""detr.py: box ops, GIoU, Hungarian matcher, set criterion, COCO post-processing, the detector."""
import contextlib
import io
import itertools

import pytest
import torch
from torch.testing import assert_close

import detr
import mobileformer


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
    assert_close(detr.box_xyxy_to_cxcywh(detr.box_cxcywh_to_xyxy(b)), b)
    xyxy = detr.box_cxcywh_to_xyxy(b)
    assert_close(detr.box_cxcywh_to_xyxy(detr.box_xyxy_to_cxcywh(xyxy)), xyxy)
    assert_close(detr.box_cxcywh_to_xyxy(torch.tensor([0.5, 0.5, 0.2, 0.4])), torch.tensor([0.4, 0.3, 0.6, 0.7]))


@pytest.mark.parametrize("a, b, expected", [
    ([0, 0, 1, 1], [0, 0, 1, 1], 1.0),                        # identical
    ([0, 0, 1, 1], [2, 0, 3, 1], -1 / 3),                     # disjoint: 0 − (3 − 2) / 3
    ([0, 0, 2, 2], [0.5, 0.5, 1.5, 1.5], 0.25),               # nested: IoU 1/4, enclosing = union
    ([0, 0, 1, 1], [1, 0, 2, 1], 0.0),                        # touching edges: IoU 0, enclosing = union
    ([0, 0, 2, 2], [1, 1, 3, 3], 1 / 7 - 2 / 9),              # overlap: inter 1, union 7, enclosing 9
])
def test_giou_hand_values(a, b, expected):
    a, b = torch.tensor([a], dtype=torch.float64), torch.tensor([b], dtype=torch.float64)
    assert_close(detr.generalized_box_iou(a, b), torch.tensor([[expected]], dtype=torch.float64))
    assert_close(detr.generalized_box_iou(b, a), torch.tensor([[expected]], dtype=torch.float64))


@pytest.mark.parametrize("a, b, expected", [
    ([0, 0, 1, 1], [0, 0, 1, 1], 1.0), ([0, 0, 1, 1], [2, 0, 3, 1], 0.0), ([0, 0, 2, 2], [0.5, 0.5, 1.5, 1.5], 0.25),
    ([0, 0, 2, 2], [1, 1, 3, 3], 1 / 7)])
def test_iou_hand_values(a, b, expected):
    a, b = torch.tensor([a], dtype=torch.float64), torch.tensor([b], dtype=torch.float64)
    assert_close(detr.box_iou(a, b), torch.tensor([[expected]], dtype=torch.float64))
    assert_close(detr.box_iou(b, a), torch.tensor([[expected]], dtype=torch.float64))


def test_giou_pairwise_shape_and_symmetry():
    g = torch.Generator().manual_seed(1)
    a, b = detr.box_cxcywh_to_xyxy(_boxes(g, 4)), detr.box_cxcywh_to_xyxy(_boxes(g, 6))
    m = detr.generalized_box_iou(a, b)
    assert m.shape == (4, 6) and bool(((m >= -1) & (m <= 1)).all())
    assert_close(m, detr.generalized_box_iou(b, a).T)
    assert_close(detr.generalized_box_iou(a, a).diagonal(), torch.ones(4))
    with pytest.raises(ValueError, match="a, b"):
        detr.generalized_box_iou(a[0], b)


# --- matcher -------------------------------------------------------------------------------------------------------
def _cost_matrix(logits, boxes, t):
    """DETR's matching cost for one image, written out directly: (Q, n)."""
    prob = logits.softmax(-1)[:, t["labels"]]
    l1 = (boxes[:, None] - t["boxes"][None]).abs().sum(-1)
    giou = detr.generalized_box_iou(detr.box_cxcywh_to_xyxy(boxes), detr.box_cxcywh_to_xyxy(t["boxes"]))
    return -1.0 * prob + 5.0 * l1 - 2.0 * giou


def test_matcher_cost_equals_brute_force_minimum():
    g = torch.Generator().manual_seed(2)
    Q, K = 5, 3
    for n in [1, 2, 3, 4, 5, 2, 4]:
        logits, boxes = torch.randn(1, Q, K + 1, generator=g), _boxes(g, Q)[None]
        targets = _targets(g, [n], K)
        (p, t), = detr.hungarian_match(logits, boxes, targets)
        cost = _cost_matrix(logits[0], boxes[0], targets[0])
        assert len(p) == len(t) == n and len(set(p.tolist())) == n and sorted(t.tolist()) == list(range(n))
        best = min(sum(cost[q, j] for j, q in enumerate(perm)) for perm in itertools.permutations(range(Q), n))
        assert_close(cost[p, t].sum(), best)


def test_matcher_batched_equals_per_image_and_empty_targets():
    g = torch.Generator().manual_seed(3)
    sizes = [3, 0, 5, 1]
    logits, boxes = torch.randn(4, 8, 6, generator=g), torch.stack([_boxes(g, 8) for _ in sizes])
    targets = _targets(g, sizes, 5)
    batched = detr.hungarian_match(logits, boxes, targets)
    for i, (p, t) in enumerate(batched):
        (p1, t1), = detr.hungarian_match(logits[i:i + 1], boxes[i:i + 1], targets[i:i + 1])
        assert torch.equal(p, p1) and torch.equal(t, t1) and len(p) == sizes[i]
        assert p.dtype == t.dtype == torch.int64
    empty = detr.hungarian_match(logits[:2], boxes[:2], _targets(g, [0, 0], 5))
    assert all(p.numel() == 0 and t.numel() == 0 for p, t in empty)
    with pytest.raises(ValueError, match="targets"):
        detr.hungarian_match(logits, boxes, targets[:2])


# --- criterion -----------------------------------------------------------------------------------------------------
def _outputs(g, B, Q, K, layers):
    raw = [(torch.randn(B, Q, K + 1, generator=g).requires_grad_(), torch.randn(B, Q, 4, generator=g).requires_grad_())
           for _ in range(layers)]
    outs = [{"pred_logits": lg, "pred_boxes": bx.sigmoid()} for lg, bx in raw]
    return {**outs[-1], "aux_outputs": outs[:-1]}, raw


def test_criterion_gradient_reaches_logits_and_boxes_of_every_layer():
    g = torch.Generator().manual_seed(4)
    outputs, raw = _outputs(g, 2, 6, 4, layers=3)
    losses = detr.SetCriterion(4)(outputs, _targets(g, [2, 3], 4))
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
    crit = detr.SetCriterion(K)
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
    res = detr.postprocess({"pred_logits": logits, "pred_boxes": boxes}, torch.tensor([[100, 200]]),
                           image_ids=[7], category_ids=[3, 9])
    score = logits.softmax(-1)[0, 0, 0].item()
    assert len(res) == 1 and res[0]["image_id"] == 7 and res[0]["category_id"] == 3
    assert res[0]["bbox"] == pytest.approx([50.0, 25.0, 100.0, 50.0]) and res[0]["score"] == pytest.approx(score)
    with pytest.raises(ValueError, match="category_ids"):
        detr.postprocess({"pred_logits": logits, "pred_boxes": boxes}, [[100, 200]], image_ids=[7], category_ids=[3])


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
    results = detr.postprocess(outputs, sizes, image_ids=[11, 12], category_ids=cats)
    assert len(results) == 2 * Q
    assert _coco_eval(gt, results) == pytest.approx(1.0)
    wrong = detr.postprocess(outputs, sizes, image_ids=[11, 12], category_ids=[3, 7, 1])   # labels mapped wrongly
    assert _coco_eval(gt, wrong) < 0.1


# --- the detector --------------------------------------------------------------------------------------------------
def _train_steps(model, steps=2):
    g = torch.Generator().manual_seed(5)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    crit = detr.SetCriterion(model.config.num_classes)
    for _ in range(steps):
        images, targets = torch.randn(2, 3, 64, 64, generator=g), _targets(g, [2, 1], model.config.num_classes)
        loss = crit(model(images), targets)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_frozen_backbone_weights_and_bn_statistics_unchanged():
    torch.manual_seed(0)
    model = detr.create("mf-tiny", decoder="mf-dec-tiny", num_classes=3, num_queries=8, frozen=True).train()
    assert model.training and not model.backbone.training
    backbone = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    decoder = {k: v.clone() for k, v in model.decoder.state_dict().items()}
    _train_steps(model)
    for k, v in model.backbone.state_dict().items():
        assert torch.equal(v, backbone[k]), k
    assert all(p.grad is None for p in model.backbone.parameters())
    assert not torch.equal(model.decoder.queries, decoder["queries"])
    assert any(not torch.equal(v, decoder[k]) for k, v in model.decoder.state_dict().items() if "running_mean" in k)
    # the same steps without freezing do move the backbone's BN statistics and weights
    free = detr.create("mf-tiny", decoder="mf-dec-tiny", num_classes=3, num_queries=8).train()
    before = {k: v.clone() for k, v in free.backbone.state_dict().items()}
    _train_steps(free, steps=1)
    changed = [k for k, v in free.backbone.state_dict().items() if not torch.equal(v, before[k])]
    assert any("running_var" in k for k in changed) and any(k.endswith("conv.weight") for k in changed)


def test_shapes_at_800x1333():
    torch.manual_seed(0)
    model = detr.create("mf-tiny", decoder="mf-dec-211", num_classes=91).eval()
    seen = []
    for stage in model.decoder.stages:
        stage[0].register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape)))
    with torch.no_grad():
        out = model(torch.randn(1, 3, 800, 1333))
    assert seen == [(1, 256, 25, 42), (1, 256, 50, 84), (1, 256, 100, 167)]
    assert out["pred_logits"].shape == (1, 100, 92) and out["pred_boxes"].shape == (1, 100, 4)
    assert len(out["aux_outputs"]) == 3 and all(a["pred_boxes"].shape == (1, 100, 4) for a in out["aux_outputs"])
    assert bool(((out["pred_boxes"] > 0) & (out["pred_boxes"] < 1)).all())


@pytest.mark.parametrize("decoder, paper", [("mf-dec-522", (19.4, 18.6, 18.2)), ("mf-dec-211", (9.2, 8.4, 8.0))])
def test_head_parameters_within_ten_percent_of_tables_4_and_18(decoder, paper):
    for backbone, expected in zip(("mf-w2880", "mf-w1440", "mf-w720"), paper):
        with torch.device("meta"):
            model = detr.create(backbone, decoder=decoder, num_classes=91)
        head = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("backbone."))
        assert abs(head / 1e6 / expected - 1) < 0.10, (backbone, head)


def test_config_round_trip_and_errors():
    model = detr.create("mf-tiny", decoder="mf-dec-tiny", num_classes=5, num_queries=7, frozen=True)
    again = detr.DETR.from_config(model.config_dict(), encoder=mobileformer.create("mf-tiny"))
    assert again.config.frozen and again.decoder.config == model.decoder.config
    assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="decoder"):
        detr.create("mf-tiny", decoder="mf-dec-999", num_classes=5)
    with pytest.raises(ValueError, match="depths"):
        detr.DecoderConfig(depths=(1, 0, 1))
    with pytest.raises(ValueError, match="num_classes"):
        detr.SetCriterion(0)


# --- padded batches (DETR's images of different sizes) --------------------------------------------------------------
def _padded(images):
    """Images (3, h, w) top-left on one zero canvas, with DETR's padding mask (True on padding)."""
    H, W = max(i.shape[1] for i in images), max(i.shape[2] for i in images)
    x, mask = torch.zeros(len(images), 3, H, W), torch.ones(len(images), H, W, dtype=torch.bool)
    for b, image in enumerate(images):
        x[b, :, :image.shape[1], :image.shape[2]], mask[b, :image.shape[1], :image.shape[2]] = image, False
    return x, mask


def test_padding_changes_no_prediction():
    """Each image's predictions in a padded batch are those it gets alone (eval mode), to float rounding, for sizes
    whose maps are odd at every scale; without the mask they are not."""
    torch.manual_seed(0)
    model = detr.create("mf-tiny", decoder="mf-dec-tiny", num_classes=3, num_queries=8).eval()
    for m in model.modules():  # outputs that depend visibly on the input: PyTorch's Linear init, BN stats off (0, 1)
        if isinstance(m, torch.nn.Linear):
            m.reset_parameters()
        elif isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, h, w, generator=g) for h, w in ((70, 52), (48, 96), (33, 40))]
    x, mask = _padded(images)
    with torch.no_grad():
        batch, leaky = model(x, mask), model(x)
        for b, image in enumerate(images):
            alone = model(image[None])
            for key in ("pred_logits", "pred_boxes"):
                assert_close(batch[key][b], alone[key][0])
                assert_close(batch["aux_outputs"][0][key][b], alone["aux_outputs"][0][key][0])
            assert (leaky["pred_logits"][b] - alone["pred_logits"][0]).abs().max() > 1e-2
        # a batch with nothing padded takes the plain path
        plain = model(x[:1, :, :70, :52], mask[:1, :70, :52])
        assert_close(plain["pred_logits"], model(images[0][None])["pred_logits"])


def test_sine_positions_are_normalized_by_each_images_own_extent():
    h, w, dim = 5, 7, 16
    keep = torch.zeros(2, 1, h, w)
    keep[0, :, :3, :4] = 1
    keep[1] = 1
    pe = detr.sine_position_encoding(h, w, dim, keep=keep)
    assert pe.shape == (2, dim, h, w) and torch.isfinite(pe).all()
    assert_close(pe[0, :, :3, :4], detr.sine_position_encoding(3, 4, dim)[0])
    assert_close(pe[1], detr.sine_position_encoding(h, w, dim)[0])
    n, freq = dim // 4, 10000 ** (torch.arange(dim // 4) / (dim // 4))   # DETR's formula at pixel centres
    y = (torch.arange(h) + 0.5) / h * 2 * torch.pi
    assert_close(pe[1, :n, :, 0], (y[None] / freq[:, None]).sin())
    assert_close(pe[1, n:2 * n, :, 0], (y[None] / freq[:, None]).cos())
