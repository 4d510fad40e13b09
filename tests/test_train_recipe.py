"""The training recipe as the paper and DETR run it: --batch-size is the global batch, split over processes
and accumulation steps; gradient clipping (DETR's max-norm 0.1) in the detection presets; detr-finetune continues the
probe's whole detector."""
import argparse
import json

import pytest
import torch
from safetensors.torch import load_file

import classify
import tasks
import train
import weights
from conftest import TINY_DETR


@pytest.mark.parametrize("batch, processes, accum, local", [
    (32, 1, 1, 32), (32, 2, 1, 16), (32, 2, 2, 8), (4096, 8, 1, 512), (1024, 8, 4, 32), (16, 8, 1, 2), (128, 1, 4, 32)])
def test_the_global_batch_splits_over_processes_and_accumulation(batch, processes, accum, local):
    assert train.per_process_batch(batch, processes=processes, grad_accum=accum) == local
    assert local * processes * accum == batch


@pytest.mark.parametrize("batch, processes, accum", [(30, 8, 1), (16, 2, 3), (2, 8, 1)])
def test_a_global_batch_that_does_not_divide_is_refused(batch, processes, accum):
    with pytest.raises(ValueError, match=f"--batch-size {batch}: the global batch must divide by processes x "
                                         f"--grad-accum = {processes} x {accum} = {processes * accum}"):
        train.per_process_batch(batch, processes=processes, grad_accum=accum)


@pytest.mark.parametrize("task, preset, batch, clip", [
    ("detr-probe", "paper", 16, 0.1), ("detr-finetune", "paper", 16, 0.1), ("detr-probe", "small", 16, 0.1),
    ("finola", "paper", 128, 0.0), ("masked-b", "paper", 1024, 0.0), ("linprobe", "paper", 4096, 0.0)])
def test_paper_batches_are_totals_and_only_detection_clips(task, preset, batch, clip):
    args = train.parse_args(["--task", task, "--preset", preset])
    assert (args.batch_size, args.clip_grad) == (batch, clip)


def test_clipping_bounds_the_update_of_a_run(tmp_path, monkeypatch):
    """With --clip-grad, the gradient the optimizer sees has norm <= the bound (recorded at each optimizer step)."""
    import torch
    norms = []
    real_step = torch.optim.AdamW.step

    def spy(self, *a, **k):
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        norms.append(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item())
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    base = ["--task", "finola", "--data", "photos", "--data-options",
            '{"crops_per_photo": 2, "with_wallpapers": false}', "--channels", "16", "--grid", "2", "--widths", "16",
            "16", "16", "16", "16", "--batch-size", "4", "--max-steps", "2", "--pca-images", "0",
            "--spectral-loss", "0", "--optimizer", "adamw"]
    train.main(base + ["--out", str(tmp_path / "free")])
    free, norms[:] = list(norms), []
    train.main(base + ["--clip-grad", "0.01", "--out", str(tmp_path / "clipped")])
    assert max(free) > 0.01, "the bound is below the natural gradient norm, so clipping acts"
    assert max(norms) <= 0.01 * (1 + 1e-5)




def test_finetuning_from_a_probe_file_starts_at_the_probe(tmp_path):
    """App. C: COCO fine-tuning follows the decoder probe. From a DETR file, detr-finetune starts with all of the
    probe's weights (decoder, queries, heads, backbone) and its AP, and trains the backbone."""
    probe = tmp_path / "probe"
    train.main(["--task", "detr-probe", *TINY_DETR, "--max-steps", "3", "--lr", "1e-3", "--out", str(probe)])
    probe_ap = [json.loads(line) for line in (probe / "metrics.jsonl").read_text().splitlines()][-1]["final"]
    argv = ["--task", "detr-finetune", *TINY_DETR, "--init", str(probe / "model.safetensors"), "--max-steps", "2",
            "--lr", "1e-3", "--out", str(tmp_path / "ft")]
    start = train.TASKS["detr-finetune"].build(train.parse_args(argv))
    assert weights.arch_of(start) == "detr" and start.config_dict()["frozen"] is False and start.training
    saved = load_file(probe / "model.safetensors")
    assert start.state_dict().keys() == saved.keys()
    assert all(torch.equal(v, saved[k]) for k, v in start.state_dict().items()), "every weight is the probe's"
    assert all(p.requires_grad for p in start.backbone.parameters())
    args = train.parse_args(argv)
    before = tasks.evaluate(train.TASKS["detr-finetune"], start.eval(), args, tmp_path)
    assert before["AP"] == pytest.approx(probe_ap["AP"]) and before["AP50"] == pytest.approx(probe_ap["AP50"])

    train.main(argv)
    after = weights.load_model(tmp_path / "ft" / "model.safetensors")
    moved = [k for k, v in after.backbone.state_dict().items() if k.endswith("weight")
             and not torch.equal(v, saved["backbone." + k])]
    assert moved, "fine-tuning trains the probe's backbone"


def test_a_probe_file_of_other_classes_is_refused(tmp_path, monkeypatch):
    probe = tmp_path / "probe"
    train.main(["--task", "detr-probe", *TINY_DETR, "--max-steps", "1", "--out", str(probe)])
    import data
    monkeypatch.setattr(data, "categories", lambda ds: [0, 1, 2])  # data of 3 classes, not the shapes' 4
    argv = ["--task", "detr-finetune", *TINY_DETR, "--init", str(probe / "model.safetensors")]
    with pytest.raises(ValueError, match="a detector of 4 classes, but --data 'shapes' has 3"):
        train.TASKS["detr-finetune"].build(train.parse_args(argv))


@pytest.mark.parametrize("task, old, new, value", [("linprobe", "--head", "decoder", "tran-1"),
                                                   ("mae", "--upsampler-width", "decoder_width", 32),
                                                   ("mae", "--upsampler-depth", "decoder_depth", 2)])
def test_renamed_flags_keep_working_for_a_release_with_a_warning(task, old, new, value):
    with pytest.warns(FutureWarning, match=f"{old} is now --{new.replace('_', '-')} for --task {task}"):
        args = train.parse_args(["--task", task, old, str(value)])
    assert getattr(args, new) == value and not hasattr(args, "head")


def test_a_run_saved_with_the_old_flag_names_resumes_with_the_new_ones():
    """args.json of a classifier run before the rename: its decoder under "head", DETR's default under "decoder";
    of an MAE run: its decoder's width and depth under "upsampler_*"."""
    saved = vars(train.parse_args(["--task", "linprobe"])) | {"head": "tran-1", "decoder": "mf-dec-tiny"}
    assert train.renamed_flags(argparse.Namespace(**saved), warn=False).decoder == "tran-1"
    saved = {k: v for k, v in vars(train.parse_args(["--task", "mae"])).items() if not k.startswith("decoder_")}
    mae = train.renamed_flags(argparse.Namespace(**saved | {"upsampler_width": 48, "upsampler_depth": 3}), warn=False)
    assert (mae.decoder_width, mae.decoder_depth) == (48, 3)
    detr = vars(train.parse_args(["--task", "detr-probe"])) | {"head": "lin"}  # not a classifier: head is dropped
    assert train.renamed_flags(argparse.Namespace(**detr), warn=False).decoder == "mf-dec-tiny"


def test_a_decoder_of_the_other_kind_gets_a_clear_error():
    with pytest.raises(ValueError, match=r"--decoder mf-dec-tiny: --task linprobe takes one of \['lin'"):
        tasks.decoder_of(train.parse_args(["--task", "linprobe", "--decoder", "mf-dec-tiny"]), classify.DECODERS)
