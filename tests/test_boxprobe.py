"""boxprobe.py: the background boxes, the linear probe and the features it reads off an encoder's maps per box."""
import math

import numpy as np
import torch

import boxprobe
import data
import detection
import layers
import mobileformer


def test_background_boxes_keep_each_size_stay_inside_and_miss_every_object():
    boxes = torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.1], [0.5, 0.5, 0.05, 0.4]])
    for seed in range(20):
        bg = boxprobe.background_boxes(boxes, torch.Generator().manual_seed(seed))
        assert len(bg) == 3, "small boxes in a mostly empty image always find a free place"
        torch.testing.assert_close(bg[:, 2:], boxes[:, 2:])
        xyxy = detection.box_cxcywh_to_xyxy(bg)
        assert (xyxy[:, :2] >= 0).all() and (xyxy[:, 2:] <= 1 + 1e-6).all()
        assert (detection.box_iou(xyxy, detection.box_cxcywh_to_xyxy(boxes)) < 0.3).all()
    full = torch.tensor([[0.5, 0.5, 1.0, 1.0]])  # the whole image: no free place
    assert len(boxprobe.background_boxes(full, torch.Generator().manual_seed(0))) == 0


def test_linear_probe_separates_separable_classes_and_not_noise():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 8, generator=g) * 5
    labels = torch.arange(3).repeat(40)
    x = centres[labels] + torch.randn(len(labels), 8, generator=g)
    split = lambda x, y: ((x[:90], y[:90]), (x[90:], y[90:]))  # noqa: E731
    separable = boxprobe.linear_probe(*split(x, labels))
    assert separable["train_acc"] == 1.0 and separable["val_acc"] == 1.0
    assert (separable["train_n"], separable["val_n"]) == (90, 30)
    noise = boxprobe.linear_probe(*split(torch.randn(120, 8, generator=g), labels))
    assert noise["val_acc"] < 0.6, "labels unrelated to the features: near chance (1/3) on held-out rows"


def test_box_features_read_each_box_off_the_encoder_maps():
    torch.manual_seed(0)
    encoder = mobileformer.create("mf-tiny").eval()
    ds = data.load("shapes", n=3)
    feats, labels = boxprobe.box_features(encoder, ds, size=64, background=False)
    objects = sum(len(row["objects"]["bbox"]) for row in ds)
    ch = encoder.map_channels
    assert feats.shape == (objects, 3 * (ch["stride8"] + ch["features"]))
    assert labels.tolist() == [k for row in ds for k in row["objects"]["category_id"]]
    # the first box by hand: its cells on the 1/8 map (8x8 at 64), mean / max / centre
    x0, y0, w, h = ds[0]["objects"]["bbox"][0]
    image = torch.from_numpy(np.array(data.decode(ds[0]["image"]))).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():  # a 64² image at size 64: the resize keeps it as it is
        f = encoder.forward_features(layers.PixelNorm()(image))["stride8"][0]
    c0, r0, c1, r1 = int(x0 / 8), int(y0 / 8), math.ceil((x0 + w) / 8), math.ceil((y0 + h) / 8)
    cells = f[:, r0:r1, c0:c1]
    centre = f[:, int((y0 + h / 2) / 8), int((x0 + w / 2) / 8)]
    n = ch["stride8"]
    torch.testing.assert_close(feats[0, :3 * n], torch.cat([cells.mean((1, 2)), cells.amax((1, 2)), centre]))
    with_background, bg_labels = boxprobe.box_features(encoder, ds, size=64, background=True)
    cats = [row["objects"]["category_id"] for row in ds]  # each image's objects, then as many background boxes
    assert bg_labels.tolist() == [k for c in cats for k in c + [4] * len(c)]
    assert with_background.shape == (2 * objects, feats.shape[1])
