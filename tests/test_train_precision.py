"""`accelerate launch --mixed_precision bf16 train.py ...` for every task family on CPU: the loss is
finite and close to fp32's. Accelerate reads the precision from the environment it launches with
(ACCELERATE_MIXED_PRECISION), so each run is its own process."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = ["--data", "photos", "--data-options", '{"crops_per_photo": 2, "with_wallpapers": false}']
FAMILIES = {
    "finola": ["--task", "finola", *PHOTOS, "--channels", "16", "--grid", "2", "--widths", "16", "16", "16", "16",
               "16", "--spectral-loss", "0", "--optimizer", "adamw"],
    "masked-b": ["--task", "masked-b", *PHOTOS, "--image-size", "64", "--grid", "4", "--upsampler-width", "32",
                 "--upsampler-depth", "1"],
    "detr-probe": ["--task", "detr-probe", "--data", "shapes", "--data-options", '{"n": 8, "size": 32}',
                   "--decoder", "mf-dec-tiny", "--num-queries", "10", "--image-size", "32"],
    "supervised": ["--task", "supervised", "--image-size", "32", "--crop-ratio", "1"],
}


@pytest.fixture(scope="module")
def classes(tmp_path_factory):
    """A class-per-folder set of 8 small images, for the classification family."""
    root = tmp_path_factory.mktemp("classes")
    g = torch.Generator().manual_seed(0)
    for c in ("a", "b"):
        (root / c).mkdir()
        for n in range(4):
            pixels = (torch.rand(40, 40, 3, generator=g) * 255).byte().numpy()
            Image.fromarray(pixels).save(root / c / f"{n}.png")
    return root


def first_losses(argv, out, precision):
    env = {**os.environ, "ACCELERATE_MIXED_PRECISION": precision}
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *argv, "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_bf16_runs_every_task_family_close_to_fp32(family, classes, tmp_path):
    argv = FAMILIES[family] + ["--batch-size", "4", "--max-steps", "2", "--log-every", "1", "--no-augment",
                               "--pca-images", "0", "--threads", "1"]
    if family == "supervised":
        argv += ["--data", str(classes)]
    fp32 = first_losses(argv, tmp_path / "fp32", "no")
    bf16 = first_losses(argv, tmp_path / "bf16", "bf16")
    assert len(bf16) == 2 and all(torch.isfinite(torch.tensor(bf16)))
    assert bf16[0] != fp32[0], "bf16 autocast was in effect"
    assert bf16[0] == pytest.approx(fp32[0], rel=0.05), "the same first batch and weights: bf16 rounding only"


@pytest.mark.slow
def test_compile_trains_and_saves_plain_weights(tmp_path, monkeypatch):
    """--compile wraps the model in torch.compile; the weights file keeps the plain parameter names, so it loads
    without compile. Dynamo's eager backend stands in for inductor here (the same wrapper, minutes less of codegen)."""
    import functools

    import train
    import weights
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    out = tmp_path / "run"
    train.main(FAMILIES["finola"] + ["--batch-size", "4", "--max-steps", "2", "--pca-images", "0", "--compile",
                                     "--out", str(out)])
    model = weights.load_model(out / "model.safetensors")
    assert not any("_orig_mod" in k for k in model.state_dict())
    assert model.metadata["train"]["compile"] is True
