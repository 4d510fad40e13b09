"""experiments.py: the recorded steps of a study, skipped when run again, and the table and directions printed from
them (the studies themselves run for minutes to hours: benchmarks, not tests)."""
import argparse
import dataclasses
import math

import numpy as np
import pytest
import torch

import autoencoder
import data
import detection
import experiments
import layers
import mobileformer
import weights


def _row(top1):
    return {"final": {"top1": top1}}


def test_a_recorded_step_is_skipped_and_survives_a_restart(tmp_path):
    study = experiments.Study(tmp_path, threads=None)
    study.record("linprobe/random/seed0", run="x", **_row(0.5))
    again = experiments.Study(tmp_path, threads=None)
    assert again.done["linprobe/random/seed0"]["final"]["top1"] == 0.5
    assert again.train("linprobe/random/seed0", ["--never-run"]) == again.done["linprobe/random/seed0"]
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == 1


def test_the_table_reports_mean_and_std_over_seeds_and_marks_each_direction():
    done = {f"linprobe/{enc}/seed{s}": _row(v) for enc, values in
            {"finola": [0.70, 0.72, 0.74], "masked-b": [0.75, 0.77, 0.79], "masked-e": [0.60, 0.60, 0.60]}.items()
            for s, v in enumerate(values)}
    done["pretrain/finola"] = {"img_per_s": 250.0, "train_s": 1500.0, "steps": 11718,
                               "final": {"psnr_db": 18.3}}
    done["curvature"] = {"checkpoints": {"finola": {"score_topk_median": 1.26}}}
    text = experiments.markdown(done)
    finola = next(line for line in text.splitlines() if line.startswith("| finola |"))
    assert "| 250 | 25.0 | 6.25 | 18.30 dB |" in finola and "72.0 ± 2.0 % (3)" in finola and "| 1.26 |" in finola
    assert "masked FINOLA-B probes above vanilla FINOLA (linprobe): **reproduced** (77.0 ± 2.0 % (3) vs 72.0" in text
    assert "masked FINOLA-E probes above vanilla FINOLA (linprobe): **not reproduced**" in text
    assert "(tran1-probe): not measured yet" in text and "| mae | – | – | – | – |" in text
    assert "Fig. 5: masked FINOLA's top-16 curvature above vanilla FINOLA's (masked-e): not measured yet" in text
    done["curvature"]["checkpoints"]["masked-b"] = {"score_topk_median": 0.9}
    done["appd/finola"], done["appd/masked-b"] = {"final": {"psnr_db": 20.0}}, {"final": {"psnr_db": 18.5}}
    text = experiments.markdown(done)
    assert ("Fig. 5: masked FINOLA's top-16 curvature above vanilla FINOLA's (masked-b): **not reproduced** "
            "(0.90 vs 1.26)") in text
    assert "Table 1: masking lowers App. D PSNR (masked-b): **reproduced** (18.50 dB vs 20.00 dB)" in text


def test_the_detection_table_reports_ap_over_seeds_and_each_claim():
    done = {f"shapes/{enc}/seed{s}": {"final": {"AP": ap, "AP50": 2 * ap}, "steps": 2500, "train_s": 420.0}
            for enc, values in {"random-mf-tiny": [0.10, 0.12, 0.14], "finola-t1": [0.20, 0.20, 0.20],
                                "supervised-t1": [0.30, 0.31, 0.32]}.items()
            for s, ap in enumerate(values)}
    box = {"random-mf-tiny": [0.70, 0.80], "finola-t1": [0.60, 0.60]}
    done |= {f"box/shapes/{enc}/seed{s}": {"final": {"val_acc": acc}}
             for enc, values in box.items() for s, acc in enumerate(values)}
    text = experiments.detection_markdown(done)
    assert "| shapes | random mf-tiny | 12.0 ± 2.0 (3) | 24.0 ± 4.0 (3) | 2500 | 7.0 | 75.0 ± 7.1 % (2) |" in text
    assert "| shapes | supervised (table1's) | 31.0 ± 1.0 (3) |" in text and "| – |" in text  # no box probe yet
    assert ("shapes: FINOLA (table1's) above a random encoder of its preset (DETR probe AP): **reproduced** "
            "(20.0 ± 0.0 (3)") in text
    assert ("shapes: FINOLA above supervised pre-training of the same encoder (Table 4) (DETR probe AP): **not "
            "reproduced** (20.0 ± 0.0 (3) vs 31.0 ± 1.0 (3))") in text
    assert ("shapes: FINOLA (table1's) above a random encoder of its preset (box probe accuracy): **not reproduced** "
            "(60.0 ± 0.0 % (2) vs 75.0 ± 7.1 % (2))") in text
    assert "README" not in text and "trees" not in text, "no row and no verdict for encoders or data not run"
    done |= {f"trees/{enc}/seed{s}": {"final": {"AP": ap, "AP50": 2 * ap}, "steps": 1500, "train_s": 300.0}
             for enc, values in {"random-mf-nano": [0.010, 0.030], "finola-readme": [0.020, 0.030]}.items()
             for s, ap in enumerate(values)}
    assert ("trees: FINOLA (README's run) above a random encoder of its preset (DETR probe AP): **within seed "
            "noise** (2.5 ± 0.7 (2) vs 2.0 ± 1.4 (2))") in experiments.detection_markdown(done)


def test_background_boxes_keep_each_size_stay_inside_and_miss_every_object():
    boxes = torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.1], [0.5, 0.5, 0.05, 0.4]])
    for seed in range(20):
        bg = experiments.background_boxes(boxes, torch.Generator().manual_seed(seed))
        assert len(bg) == 3, "small boxes in a mostly empty image always find a free place"
        torch.testing.assert_close(bg[:, 2:], boxes[:, 2:])
        xyxy = detection.box_cxcywh_to_xyxy(bg)
        assert (xyxy[:, :2] >= 0).all() and (xyxy[:, 2:] <= 1 + 1e-6).all()
        assert (detection.box_iou(xyxy, detection.box_cxcywh_to_xyxy(boxes)) < 0.3).all()
    full = torch.tensor([[0.5, 0.5, 1.0, 1.0]])  # the whole image: no free place
    assert len(experiments.background_boxes(full, torch.Generator().manual_seed(0))) == 0


def test_linear_probe_separates_separable_classes_and_not_noise():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 8, generator=g) * 5
    labels = torch.arange(3).repeat(40)
    x = centres[labels] + torch.randn(len(labels), 8, generator=g)
    split = lambda x, y: ((x[:90], y[:90]), (x[90:], y[90:]))  # noqa: E731
    separable = experiments.linear_probe(*split(x, labels))
    assert separable["train_acc"] == 1.0 and separable["val_acc"] == 1.0
    assert (separable["train_n"], separable["val_n"]) == (90, 30)
    noise = experiments.linear_probe(*split(torch.randn(120, 8, generator=g), labels))
    assert noise["val_acc"] < 0.6, "labels unrelated to the features: near chance (1/3) on held-out rows"


def test_box_features_read_each_box_off_the_encoder_maps():
    torch.manual_seed(0)
    encoder = mobileformer.create("mf-tiny").eval()
    ds = data.load("shapes", n=3)
    feats, labels = experiments.box_features(encoder, ds, size=64, background=False)
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
    with_background, bg_labels = experiments.box_features(encoder, ds, size=64, background=True)
    cats = [row["objects"]["category_id"] for row in ds]  # each image's objects, then as many background boxes
    assert bg_labels.tolist() == [k for c in cats for k in c + [4] * len(c)]
    assert with_background.shape == (2 * objects, feats.shape[1])


def test_table4_rows_are_table1s_pair_the_readme_run_and_a_random_twin_of_each_preset(tmp_path):
    """Table 4's random rows are fresh encoders of the files' presets (mf-tiny for table1's, mf-nano for the README's
    run); a missing file and a file whose encoder is no preset get clear errors."""
    config = autoencoder.FinolaConfig(channels=16, grid=(2, 2), upsampler="linear", patch=16)
    save = lambda path, name: weights.save_model(  # noqa: E731
        path, autoencoder.Finola(mobileformer.create(name), config), task="finola", data="photos")
    for name in ("finola", "supervised"):
        (tmp_path / "t1" / "pretrain" / name).mkdir(parents=True)
        save(tmp_path / "t1" / "pretrain" / name / "model.safetensors", "mf-tiny")
    readme = save(tmp_path / "readme.safetensors", "mf-nano")
    args = argparse.Namespace(table1=tmp_path / "t1", finola=readme)
    rows = experiments.table4_rows(args)
    assert {k: p for k, (_, p) in rows.items()} == {"finola-t1": "mf-tiny", "supervised-t1": "mf-tiny",
                                                    "finola-readme": "mf-nano", "random-mf-tiny": "mf-tiny",
                                                    "random-mf-nano": "mf-nano"}
    assert list(rows) == ["finola-t1", "supervised-t1", "random-mf-tiny", "finola-readme", "random-mf-nano"]
    assert rows["random-mf-nano"][0] is None and rows["finola-readme"][0] == readme
    with pytest.raises(FileNotFoundError, match="finola-readme.*README's main command"):
        experiments.table4_rows(argparse.Namespace(table1=tmp_path / "t1", finola=None))
    with pytest.raises(FileNotFoundError, match="finola-t1.*experiments.py table1"):
        experiments.table4_rows(argparse.Namespace(table1=tmp_path / "none", finola=readme))
    custom = mobileformer.MobileFormer(dataclasses.replace(mobileformer.PRESETS["mf-nano"], name="custom"))
    path = weights.save_model(tmp_path / "custom.safetensors", autoencoder.Finola(custom, config), task="finola",
                              data="photos")
    with pytest.raises(ValueError, match="not one of the Mobile-Former presets"):
        experiments.encoder_preset(path)
