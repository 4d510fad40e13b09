"""detr.py: the Mobile-Former decoder and the detector (positions, reference boxes, padding, sizes)."""
import dataclasses

import pytest
import torch
from torch.testing import assert_close

import detection
import detr
import mobileformer


def _boxes(g, n):
    """n random normalized cxcywh boxes well inside the image."""
    c = 0.2 + 0.6 * torch.rand(n, 2, generator=g)
    return torch.cat([c, 0.05 + 0.3 * torch.rand(n, 2, generator=g)], dim=1)


def _targets(g, sizes, num_classes):
    return [{"labels": torch.randint(num_classes, (n,), generator=g), "boxes": _boxes(g, n)} for n in sizes]


# --- the detector --------------------------------------------------------------------------------------------------
def _train_steps(model, steps=2):
    g = torch.Generator().manual_seed(5)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    crit = detection.SetCriterion(model.config.num_classes)
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
        detection.SetCriterion(0)


# --- padded batches (DETR's images of different sizes) --------------------------------------------------------------
def _padded(images):
    """Images (3, h, w) top-left on one zero canvas, with DETR's padding mask (True on padding)."""
    H, W = max(i.shape[1] for i in images), max(i.shape[2] for i in images)
    x, mask = torch.zeros(len(images), 3, H, W), torch.ones(len(images), H, W, dtype=torch.bool)
    for b, image in enumerate(images):
        x[b, :, :image.shape[1], :image.shape[2]], mask[b, :image.shape[1], :image.shape[2]] = image, False
    return x, mask


@pytest.mark.parametrize("options", [{}, {"reference_boxes": True, "class_loss": "focal"}])
def test_padding_changes_no_prediction(options):
    """Each image's predictions in a padded batch are those it gets alone (eval mode), to float rounding, for sizes
    whose maps are odd at every scale; without the mask they are not. Reference boxes' priors are laid on each
    image's own extent too."""
    torch.manual_seed(0)
    model = detr.create("mf-tiny", decoder="mf-dec-tiny", num_classes=3, num_queries=8, **options).eval()
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
    x = (torch.arange(w) + 0.5) / w * 2 * torch.pi                      # "heads" layout: two whole encodings, each
    for half in detr.sine_position_encoding(h, w, dim, groups=2)[0].chunk(2):   # of DETR's first n / 2 frequencies
        assert_close(half[:n // 2, :, 0], (y[None] / freq[:n // 2, None]).sin())
        assert_close(half[n // 2:n, :, 0], (y[None] / freq[:n // 2, None]).cos())
        assert_close(half[n:3 * n // 2, 0], (x[None] / freq[:n // 2, None]).sin())
        assert_close(half[3 * n // 2:, 0], (x[None] / freq[:n // 2, None]).cos())


# --- positions: every head of every attention over the map sees both axes ------------------------------------------
def _head_spread(keys: torch.Tensor, heads: int) -> torch.Tensor:
    """(heads, 2): per contiguous channel group of a map (B, C, H, W), how far its vectors move along y and along x
    (RMS distance between neighbouring rows / columns)."""
    g = keys[0].unflatten(0, (heads, -1))                                    # (heads, C / heads, H, W)
    along_y = (g[:, :, 1:] - g[:, :, :-1]).square().sum(1).mean((1, 2)).sqrt()
    along_x = (g[..., 1:] - g[..., :-1]).square().sum(1).mean((1, 2)).sqrt()
    return torch.stack([along_y, along_x], dim=1)


@pytest.mark.parametrize("decoder", ["mf-dec-tiny", "mf-dec-211"])
def test_every_head_sees_both_axes_on_constant_maps(decoder):
    """On spatially constant encoder maps the keys vary by the sine encoding (and the convs' zero padding at the
    borders): at the first block of each scale, each head of every attention over the map (the bridges' and the pixel
    transformer's) moves along y and along x by at least half the largest head's movement. In DETR's "axes" layout
    the first bridge's heads each see one axis (the other moves only at the borders), and fail."""
    for layout in ("heads", "axes"):
        torch.manual_seed(0)
        config = dataclasses.replace(detr.PRESETS[decoder], position_layout=layout, num_queries=4)
        model = detr.DETR(mobileformer.create("mf-tiny"), detr.DETRConfig(decoder=config, num_classes=3)).eval()
        seen = []
        for stage in model.decoder.stages:
            stage[0].mobile_to_former.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
        with torch.no_grad():
            model.decoder(torch.ones(1, 240, 8, 8), torch.ones(1, 24, 16, 16))
        assert len(seen) == 3
        for scale, keys in enumerate(seen):
            assert float(keys.std((2, 3)).max()) > 0.1                      # the positions are there
            for heads in (config.bridge_heads, config.heads):
                spread = _head_spread(keys, heads)
                fair = bool((spread >= 0.5 * spread.max()).all())
                if layout == "heads" or scale == 0:
                    assert fair == (layout == "heads"), (layout, scale, heads, spread)


def test_files_without_a_position_layout_keep_detrs():
    model = detr.create("mf-tiny", decoder="mf-dec-tiny", num_classes=3, num_queries=4)
    config = model.config_dict()
    assert config["decoder"]["position_layout"] == "heads"
    del config["decoder"]["position_layout"]
    old = detr.DETR.from_config(config, encoder=mobileformer.create("mf-tiny"))
    assert old.decoder.config.position_layout == "axes" and old.decoder.config.position_groups == 1


# --- reference boxes ----------------------------------------------------------------------------------------------
def test_box_prior_is_zero_at_the_centre_and_minus_half_on_each_edge():
    y, x = detr.pixel_centres(4, 4)                                   # centres at 1/8, 3/8, 5/8, 7/8
    boxes = torch.tensor([[[3 / 8, 5 / 8, 0.5, 0.25]]])                # w/2 = 1/4, h/2 = 1/8
    prior = detr.box_prior(boxes, y, x).reshape(4, 4)
    assert prior[2, 1] == 0                                            # row 5/8, column 3/8: the centre
    assert_close(prior[2, 2], torch.tensor(-0.5))                      # a quarter to the right: the edge
    assert_close(prior[1, 1], torch.tensor(-2.0))                      # a quarter up: two half-heights
    assert_close(prior[1, 2], torch.tensor(-2.5))


def test_reference_boxes_start_at_the_anchors_and_refine():
    torch.manual_seed(0)
    model = detr.create("mf-tiny", decoder="mf-dec-tiny", num_classes=3, num_queries=6, reference_boxes=True).eval()
    with torch.no_grad():
        out = model(torch.rand(2, 3, 64, 64))
    first = out["aux_outputs"][0]["pred_boxes"]
    assert_close(first, model.decoder.anchors.sigmoid().expand_as(first))  # a zero offset from the anchors
    centres = model.decoder.anchors.detach().sigmoid()[:, :2]
    assert float(centres.min()) >= 0 and float(centres.max()) <= 1 and float(centres.std()) > 0.1
    _train_steps(model.train())
    with torch.no_grad():
        moved = model.eval()(torch.rand(2, 3, 64, 64))
    assert not torch.allclose(moved["pred_boxes"], moved["aux_outputs"][0]["pred_boxes"])
    with pytest.raises(ValueError, match="box_head"):
        model.decoder(torch.ones(1, 240, 4, 4), torch.ones(1, 24, 8, 8))


# --- denoising queries (DN-DETR) -------------------------------------------------------------------------------------
def test_denoising_queries_change_nothing_the_object_queries_compute():
    """Denoising tokens attend to the object queries, never the reverse, and write nothing into the map: the object
    queries' outputs are those of a forward pass without them (dropout off, BatchNorm fixed)."""
    torch.manual_seed(0)
    model = detr.create("mf-tiny", decoder="mf-dec-tiny", num_classes=4, num_queries=6, reference_boxes=True,
                        class_loss="focal", denoising=3).train()
    model.decoder.dropout.p = 0.0
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eval()
    g = torch.Generator().manual_seed(0)
    targets = _targets(g, [1, 3, 0], 4)
    x = torch.rand(3, 3, 64, 64, generator=g)
    with torch.no_grad():
        with_dn, without = model(x, None, targets), model(x)
    assert "dn_outputs" in with_dn and "dn_outputs" not in without
    assert len(with_dn["dn_outputs"]) == 3 and with_dn["dn_outputs"][0]["pred_boxes"].shape == (3, 9, 4)
    for key in ("pred_logits", "pred_boxes"):
        assert_close(with_dn[key], without[key])
        assert_close(with_dn["aux_outputs"][0][key], without["aux_outputs"][0][key])
    model.eval()                                                    # inference: no denoising queries
    assert "dn_outputs" not in model(torch.rand(1, 3, 64, 64), None, targets[:1])
    with pytest.raises(ValueError, match="denoising"):
        detr.create("mf-tiny", decoder="mf-dec-tiny", num_classes=4, denoising=2)


def test_noised_targets_stay_near_their_boxes():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    targets = _targets(g, [2, 0, 3], 5)
    dn = detection.noised_targets(targets, groups=4, num_classes=5, box_noise=0.4, label_noise=0.5)
    assert dn["boxes_in"].shape == (3, 12, 4) and dn["group"].tolist() == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3
    assert dn["valid"].sum(1).tolist() == [8, 0, 12]
    v = dn["valid"]
    shift = (dn["boxes_in"] - dn["boxes"])[v].abs()
    side = dn["boxes"][v][:, 2:]
    assert bool((shift[:, :2] <= 0.2 * side + 1e-6).all()) and bool((shift[:, 2:] <= 0.4 * side + 1e-6).all())
    assert shift.max() > 0                                          # they do move
    assert torch.equal(dn["labels"][0, :2], targets[0]["labels"]) and torch.equal(dn["labels"][0, 3:5],
                                                                                     targets[0]["labels"])
    flipped = (dn["labels_in"] != dn["labels"])[v].float().mean()
    assert 0.1 < flipped < 0.7                                      # about label_noise x (1 - 1/5) = 0.4


def test_denoising_loss_is_the_layer_terms_on_the_valid_queries():
    g = torch.Generator().manual_seed(2)
    targets = _targets(g, [2, 1], 3)
    torch.manual_seed(0)
    dn = detection.noised_targets(targets, groups=2, num_classes=3)
    logits, boxes = torch.randn(2, 4, 3, generator=g), _boxes(g, 8).reshape(2, 4, 4)
    crit = detection.SetCriterion(3, class_loss="focal")
    terms = crit.denoising_losses(logits, boxes, dn, num_boxes=1.5)
    v = dn["valid"]
    assert v.sum() == 6
    assert_close(terms["loss_bbox"], (boxes[v] - dn["boxes"][v]).abs().sum() / (1.5 * 2))
    assert_close(terms["loss_ce"], crit.class_term(logits[v][None], dn["labels"][v][None], 1.5 * 2))
    outputs = {"pred_logits": torch.zeros(2, 5, 3), "pred_boxes": torch.full((2, 5, 4), 0.5), "aux_outputs": []}
    plain = crit(outputs, targets, num_boxes=1.5)["loss"]
    both = crit({**outputs, "dn_outputs": [{"pred_logits": logits, "pred_boxes": boxes}], "dn_targets": dn}, targets,
                num_boxes=1.5)["loss"]
    assert_close(both - plain, sum(crit.weights[k] * terms[k] for k in terms))
