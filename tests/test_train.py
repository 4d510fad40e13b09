"""train.py --task finola and eval.py reconstruct end to end on a tiny model and tiny data."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from torch.testing import assert_close

import augment
import autoencoder
import data
import eval as ev
import metrics
import runs
import train
import weights
from conftest import TINY_DETR, TINY_FINOLA, records

ROOT = Path(__file__).resolve().parents[1]


def run(tmp_path, *extra, name="run"):
    out = tmp_path / name
    train.main(TINY_FINOLA + ["--out", str(out), *extra])
    return out


def test_two_steps_then_rebuild_from_weights_alone(tmp_path):
    out = run(tmp_path, "--max-steps", "2", "--pca-images", "64")
    for name in ("model.safetensors", "metrics.jsonl", "args.json", "reconstructions.png", "state/trainer.json"):
        assert (out / name).exists(), name
    rows = records(out)
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]
    final = rows[-1]["final"]
    assert set(final) == {"psnr_db", "mean_colour_db", "bilinear_db", "pca_db", "pca_images", "pca_explained",
                          "images"} and final["images"] == 4 and final["pca_images"] == 64

    model = weights.load_model(out / "model.safetensors")
    meta = model.metadata
    assert meta["task"] == "finola" and meta["train"]["max_steps"] == 2 and meta["metrics"] == final
    assert model.config.pool_positions == (2, 2), "the small preset's pooler knows the 2x2 map's positions"
    # The checkpoint's weights, loaded into a model built from the flags, give the same outputs.
    args = train.parse_args(TINY_FINOLA + ["--max-steps", "2"])
    fresh = train.TASKS["finola"].build(args)
    fresh.load_state_dict(load_file(out / "state" / "model.safetensors"))
    x = torch.rand(2, 3, 32, 32)
    assert_close(model(x), fresh.eval()(x), rtol=0, atol=0)


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_resume_continues_at_the_saved_step_with_the_same_schedule(tmp_path, monkeypatch, optimizer):
    saved = {}
    real_save = runs.save_checkpoint

    def keep_step2(accelerator, out, step, epoch, **kw):
        real_save(accelerator, out, step, epoch, **kw)
        if step == 2:
            shutil.copytree(out / "state", tmp_path / "step2")
            saved["args"] = (out / "args.json").read_text()

    monkeypatch.setattr(runs, "save_checkpoint", keep_step2)
    full = run(tmp_path, "--max-steps", "5", "--checkpoint-every", "2", "--optimizer", optimizer, name="full")
    monkeypatch.setattr(runs, "save_checkpoint", real_save)

    resumed = tmp_path / "resumed"  # a run that stopped after its step-2 checkpoint
    resumed.mkdir()
    (resumed / "args.json").write_text(saved["args"])
    shutil.copytree(tmp_path / "step2", resumed / "state")
    train.main(["--task", "finola", "--resume", str(resumed)])

    before = {r["step"]: r for r in records(full) if "loss" in r}
    after = {r["step"]: r for r in records(resumed) if "loss" in r}
    assert sorted(after) == [3, 4, 5], "resumed at the saved step"
    for s in (3, 4, 5):
        assert after[s]["lr"] == before[s]["lr"]
        assert after[s]["loss"] == pytest.approx(before[s]["loss"], rel=1e-5)
    a, b = (load_file(r / "model.safetensors") for r in (full, resumed))
    for k in a:
        assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_nan_loss_stops_with_the_last_good_checkpoint(tmp_path, monkeypatch):
    real_loss = train.TASKS["finola"].loss
    calls = {"n": 0}

    def poisoned(model, batch, args):
        calls["n"] += 1
        loss = real_loss(model, batch, args)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(train.TASKS["finola"], "loss", poisoned)
    with pytest.raises(FloatingPointError, match="non-finite loss .* at step 3.*last good checkpoint is step 2"):
        run(tmp_path, "--max-steps", "4", "--checkpoint-every", "2")
    state = json.loads((tmp_path / "run" / "state" / "trainer.json").read_text())
    assert state["step"] == 2
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_moving_average_run_reports_both_normalizations(tmp_path):
    out = run(tmp_path, "--max-steps", "2", "--norm", "moving-average")
    final = records(out)[-1]["final"]
    assert {"psnr_db", "psnr_layer_norm_db"} <= set(final)
    assert final["psnr_db"] != final["psnr_layer_norm_db"], "running statistics differ from per-position ones"
    model = weights.load_model(out / "model.safetensors")
    assert model.running_var.item() != 1.0, "the running statistics were trained and saved"


def test_psnr_against_hand_computed_values():
    x = torch.zeros(2, 3, 4, 4)
    y = torch.full_like(x, 0.1)
    y[1] = 0.01
    assert_close(metrics.psnr(x, y), torch.tensor([20.0, 40.0]))
    assert_close(metrics.psnr(x, y - 5), torch.tensor([120.0, 120.0]), msg="clamped to [0, 1], then MSE floor 1e-12")
    img = torch.rand(1, 3, 8, 8)
    flat = img.mean((2, 3), keepdim=True).expand_as(img)
    assert_close(metrics.mean_colour(img), flat)
    assert_close(metrics.bilinear(flat.clone(), (2, 2)), flat, msg="a constant image survives down-then-up")


def test_eval_reconstruct_command(tmp_path, capsys):
    out = run(tmp_path, "--max-steps", "1")
    capsys.readouterr()
    result = ev.main(["reconstruct", "--weights", str(out / "model.safetensors"), "--out", str(tmp_path),
                      "--pca-images", "0"])
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last == result and last["images"] == 4
    assert last["mean_colour_db"] < last["bilinear_db"], "a 2x2 bilinear thumbnail beats one colour"
    from PIL import Image
    # 4 images of 32 px enlarged 4x to 128, in 2 rows, with 2 px gaps
    assert last["figure"] == str(tmp_path / "reconstructions.png")
    assert Image.open(last["figure"]).size == (4 * 130 + 2, 2 * 130 + 2)


def test_spectral_loss_trains_on_the_pca_baselines_directions_and_stays_out_of_the_weights(tmp_path, monkeypatch):
    """--spectral-loss: the loss weighs the error by the PCA of the baseline's crops (k = C, --pca-images of them),
    fitted before the first step; the weights file has no trace of it and loads as any FINOLA model."""
    fitted, losses = [], []
    real_fit, real_loss = metrics.analysis.fit_pca, autoencoder.SpectralMSE.forward
    monkeypatch.setattr(metrics.analysis, "fit_pca",
                        lambda images, k, **kw: fitted.append((k, kw["max_images"])) or real_fit(images, k, **kw))
    monkeypatch.setattr(autoencoder.SpectralMSE, "forward", lambda self, y, x: losses.append(self.alpha)
                        or real_loss(self, y, x))
    out = run(tmp_path, "--spectral-loss", "0.25", "--max-steps", "2", "--pca-images", "40")
    assert fitted == [(16, 40), (16, 40)] and losses == [0.25, 0.25], "one fit for the loss, one for pca_db"
    assert not any("criterion" in name for name in load_file(out / "model.safetensors"))
    assert json.loads((out / "args.json").read_text())["spectral_loss"] == 0.25
    model = weights.load_model(out / "model.safetensors")
    assert not hasattr(model, "criterion") and model(torch.rand(2, 3, 32, 32)).shape == (2, 3, 32, 32)


@pytest.mark.parametrize("flags, message", [
    (["--spectral-loss", "1"], r"--spectral-loss 1.0: expected a number in \[0, 1\)"),
    (["--spectral-loss", "0.25", "--pca-images", "0"], "it needs --pca-images > 0"),
])
def test_spectral_loss_clear_errors(tmp_path, flags, message):
    with pytest.raises(ValueError, match=message):
        run(tmp_path, "--max-steps", "1", *flags)


def test_paths_train_end_to_end_and_every_baseline_has_as_many_numbers_as_q(tmp_path, monkeypatch):
    """--paths 2 with C = 16: q holds 32 numbers, saved in the weights' config; the PCA baseline keeps 32 components."""
    fitted = []
    real = metrics.analysis.fit_pca
    monkeypatch.setattr(metrics.analysis, "fit_pca", lambda images, k, **kw: fitted.append(k) or real(images, k, **kw))
    out = run(tmp_path, "--paths", "2", "--max-steps", "1", "--pca-images", "40")
    model = weights.load_model(out / "model.safetensors")
    assert model.config.paths == 2 and model.latent == 32 and fitted == [32]
    x = torch.rand(2, 3, 32, 32)
    assert model.encode(x).shape == (2, 32) and model(x).shape == x.shape
    assert "pca_db" in records(out)[-1]["final"]


def test_bad_flags_get_clear_errors(tmp_path):
    with pytest.raises(ValueError, match=r"--image-size 48 must equal --grid 2 x 2\^\(len\(--widths\) - 1\) = 32"):
        run(tmp_path, "--image-size", "48", "--upsampler", "conv", "--widths", "16", "16", "16", "16", "16")
    with pytest.raises(ValueError, match="--image-size 33 must be a multiple of --grid 2 for --upsampler linear"):
        run(tmp_path, "--image-size", "33", "--upsampler", "linear")
    empty = tmp_path / "empty"  # a run folder with its args.json but no checkpoint yet
    empty.mkdir()
    (empty / "args.json").write_text(json.dumps(vars(train.parse_args(TINY_FINOLA + ["--out", str(empty)]))))
    with pytest.raises(FileNotFoundError, match=r"--resume '[^']*empty': .*no checkpoint"):
        train.main(["--task", "finola", "--resume", str(empty)])


@pytest.mark.slow
def test_two_processes_stay_in_sync_and_cover_the_data_once(tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(ROOT / "train.py"),
           *TINY_FINOLA, "--epochs", "2", "--out", str(out)]
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = records(out)
    epochs = [r for r in rows if "samples" in r]
    assert [r["epoch"] for r in epochs] == [0, 1]
    assert all(r["samples"] == r["dataset"] == 14 for r in epochs), epochs
    assert [r["ranks_in_sync"] for r in rows if "ranks_in_sync" in r] == [True]
    assert json.loads((out / "args.json").read_text())["batch_size"] == 4
    assert (out / "model.safetensors").exists()


@pytest.mark.slow
def test_two_processes_take_the_same_steps_when_one_gets_a_batch_of_only_unreadable_images(tmp_path):
    """8 images, a global batch of 4 = 2 a process: rank 1's first batch is two truncated files. Dropped, rank 1
    would take one step fewer and rank 0 would wait for it at the gradient sync forever; replaced, both take 4."""
    folder = tmp_path / "images"
    folder.mkdir()
    plan = data.rank_batches(8, batch_size=2, rank=1, world_size=2, shuffle=True, seed=0, epoch=0)
    for i in range(8):
        png = folder / f"{i}.png"
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(png)
        if i in plan[0]:
            png.write_bytes(png.read_bytes()[:60])
    out = tmp_path / "ddp"
    argv = [*TINY_FINOLA[:TINY_FINOLA.index("--data")], "--data", str(folder), *TINY_FINOLA[TINY_FINOLA.index("--data") + 4:], "--seed", "0",
            "--epochs", "2", "--out", str(out)]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(ROOT / "train.py"), *argv]
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = records(out)
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    assert [r["ranks_in_sync"] for r in rows if "ranks_in_sync" in r] == [True]


# --- detection tasks -------------------------------------------------------------------------------------------



def test_detr_probe_keeps_an_initialised_backbone_frozen(tmp_path, capsys):
    pre = run(tmp_path, "--max-steps", "1", name="pre")  # a FINOLA run whose encoder the probe starts from
    out = tmp_path / "probe"
    train.main(["--task", "detr-probe", *TINY_DETR, "--max-steps", "2", "--init", str(pre / "model.safetensors"),
                "--out", str(out)])
    finola_sd = load_file(pre / "model.safetensors")
    detr_sd = load_file(out / "model.safetensors")
    backbone = {k[len("backbone."):]: v for k, v in detr_sd.items() if k.startswith("backbone.")}
    assert backbone, "the detector keeps its backbone"
    for k, v in backbone.items():  # weights and BN running statistics: exactly the pre-trained encoder's
        assert torch.equal(v, finola_sd["encoder." + k]), k
    final = records(out)[-1]["final"]
    assert set(final) == {"AP", "AP50", "AP75", "APs", "APm", "APl", "images"} and final["images"] == 8
    assert (out / "detections.png").exists()

    capsys.readouterr()
    result = ev.main(["detect", "--weights", str(out / "model.safetensors")])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == result
    assert result["AP"] == pytest.approx(final["AP"])


def test_detr_finetune_trains_the_backbone(tmp_path, monkeypatch):
    """Every backbone parameter moves away from the run's own initial weights (recorded when train builds the
    model, not rebuilt), so a backbone left out of training fails; the decoder's update is the control that the
    comparison sees one at all."""
    task = train.TASKS["detr-finetune"]
    real_build, init = task.build, {}

    def recording_build(args):
        model = real_build(args)
        init.update({k: v.detach().clone() for k, v in model.named_parameters()})
        return model

    monkeypatch.setattr(task, "build", recording_build)
    out = tmp_path / "ft"
    threads = torch.get_num_threads()
    try:  # one thread: a second buys a tiny model nothing and, beside another busy process, costs it many times
        train.main(["--task", "detr-finetune", *TINY_DETR, "--max-steps", "2", "--lr", "1e-3", "--threads", "1",
                    "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    final = weights.load_model(out / "model.safetensors")
    assert final.config.frozen is False
    params = dict(final.named_parameters())
    assert set(params) == set(init)
    moved = {k for k in params if not torch.equal(params[k], init[k])}
    backbone = {k for k in params if k.startswith("backbone.")}
    assert backbone and {k for k in params if k.startswith("decoder.")} & moved, "the run updated its decoder"
    assert backbone <= moved, f"backbone parameters left at their initial values: {sorted(backbone - moved)[:5]}"


def test_eval_refuses_the_wrong_kind_of_model(tmp_path):
    out = run(tmp_path, "--max-steps", "1")
    with pytest.raises(ValueError, match="detect needs a 'detr' model"):
        ev.main(["detect", "--weights", str(out / "model.safetensors")])


def test_a_short_run_learns_more_than_each_image_s_mean_colour(tmp_path):
    """The whole pipeline (Mobile-Former -> pooling -> FINOLA -> Table 10 upsampler) learns each image's content:
    on the 7 training photos (no augmentation, all 7 in every batch) the training loss falls well below the error
    of painting every image in its own mean colour, in 60 steps."""
    out = tmp_path / "learn"
    train.main(["--task", "finola", "--data", "photos", "--data-options", '{"crops_per_photo": 1, "with_wallpapers": false}',
                "--no-augment", "--encoder", "mf-tiny", "--channels", "64", "--grid", "4", "--image-size", "32",
                "--upsampler", "conv", "--widths", "32", "16", "16", "16", "--batch-size", "7", "--max-steps", "60", "--lr", "0.03",
                "--warmup-epochs", "5", "--log-every", "5", "--pca-images", "0", "--spectral-loss", "0", "--seed", "0",
                "--optimizer", "adamw", "--out", str(out)])
    import data
    ds = data.load("photos", split="train", crops_per_photo=1, with_wallpapers=False)
    x = next(iter(data.Loader(ds, batch_size=7, transform=augment.eval_transform("classify", size=32, crop_ratio=1.0))))
    mean_colour_mse = (x["images"] - metrics.mean_colour(x["images"])).square().mean().item()
    losses = [r["loss"] for r in records(out) if "loss" in r]
    assert losses[0] > mean_colour_mse, "it starts above the mean-colour error (a fresh model knows no image)"
    assert losses[-1] < 0.5 * mean_colour_mse, (losses, mean_colour_mse)
