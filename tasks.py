"""The table of experiments: one row per ``train.py --task``.

A task says how to build its model (from the parsed flags), its loss on a batch, its training transform (and the same
without augmentation for ``--no-augment``), its final evaluation, and its presets: ``small`` (minutes on a CPU, on
data that ships with the packages) and ``paper`` (the paper's appendix). ``train.py`` owns the flags and the one loop.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch.nn.functional as F

import data
import detr
import eval as ev
import finola
import mobileformer
import weights


@dataclass
class Task:
    build: Callable      # args -> (model, arch, config dict)
    loss: Callable       # (model, batch) -> scalar loss
    transform: Callable  # args -> training transform (data.train_transform kind)
    plain: Callable      # args -> the same without augmentation (--no-augment), as at evaluation
    evaluate: Callable   # (model, args, out_dir) -> dict of final metrics (main process)
    presets: dict        # preset name -> flag defaults
    eval_command: str    # how to evaluate the weights again with eval.py


def build_finola(args):
    encoder = mobileformer.create(args.encoder)
    config = finola.FinolaConfig(
        encoder_channels=encoder.out_channels, channels=args.channels, grid=(args.grid, args.grid),
        q_position=args.q_position, norm=args.norm, widths=tuple(args.widths), encoder=encoder.config_dict())
    model = finola.Finola(encoder, config)
    if model.image_size != (args.image_size, args.image_size):
        raise ValueError(f"--image-size {args.image_size} must equal --grid {args.grid} x 2^(len(--widths) - 1) "
                         f"= {model.image_size[0]}")
    return model, "finola", dataclasses.asdict(config)


def finola_loss(model, batch):
    """Pixel MSE over the whole image (§2)."""
    x = batch["images"]
    return F.mse_loss(model(x), x)


def evaluate_finola(model, args, out: Path) -> dict:
    ds = data.load(args.data, split=args.eval_split, **args.data_options)
    loader = data.loader(ds, batch_size=args.batch_size, transform=ev.reconstruct_transform(model))
    return ev.reconstruct(model, loader, grid=out / "reconstructions.png")


FINOLA_PAPER = dict(data="hf:ILSVRC/imagenet-1k", streaming=True, epoch_size=1_281_167, encoder="mf-w2880",
                    channels=3072, grid=16, image_size=256, widths=[512, 256, 256, 128, 128], batch_size=128,
                    epochs=100, warmup_epochs=10, lr=1.5e-4, weight_decay=0.1, betas=[0.9, 0.95], checkpoint_every=2000)
FINOLA_SMALL = dict(data="photos", encoder="mf-tiny", channels=256, grid=4, image_size=32, widths=[64, 32, 32, 16],
                    batch_size=32, epochs=56, warmup_epochs=2, lr=8e-3, weight_decay=0.1, betas=[0.9, 0.95],
                    checkpoint_every=500)

def build_detr(args):
    """DETR with a Mobile-Former decoder on a backbone from --init (any of our files) or a fresh --encoder."""
    backbone = weights.load_encoder(args.init) if args.init else mobileformer.create(args.encoder)
    num_classes = max(data.categories(data.load(args.data, split="train", **args.data_options))) + 1
    model = detr.create(backbone, decoder=args.decoder, num_classes=num_classes, num_queries=args.num_queries,
                        frozen_backbone=args.task == "detr-probe")
    return model, "detr", model.config_dict()


_CRITERIA: dict[int, detr.SetCriterion] = {}


def detr_loss(model, batch):
    """DETR's set criterion on every decoder layer (CE, no-object weight 0.1; L1 x5; GIoU x2)."""
    outputs = model(batch["images"])
    k = outputs["pred_logits"].shape[-1] - 1
    criterion = _CRITERIA.setdefault(k, detr.SetCriterion(k).to(outputs["pred_logits"].device))
    return criterion(outputs, batch["targets"])["loss"]


def evaluate_detr(model, args, out: Path) -> dict:
    ds = data.load(args.data, split=args.eval_split, **args.data_options)
    loader = data.loader(ds, batch_size=args.batch_size, transform=resize(args))
    return ev.detect(model, loader, data.coco(ds), figure=out / "detections.png")


# App. C: AdamW, weight decay 1e-4, 2 images x 8 GPUs; probe 500 epochs at 1e-4 (x0.1 after 400), fine-tune 200
# epochs at 1e-5 (x0.1 after 150). DETR's lr is not scaled with the batch.
DETR_PAPER = dict(data="hf:detection-datasets/coco", encoder="mf-w2880", decoder="mf-dec-522", image_size=800,
                  batch_size=2, epochs=500, lr=1e-4, schedule="step", lr_drop_epoch=400, scale_lr=False,
                  weight_decay=1e-4, warmup_epochs=0, checkpoint_every=5000)
DETR_SMALL = dict(data="shapes", encoder="mf-tiny", decoder="mf-dec-tiny", image_size=64, batch_size=16, epochs=20,
                  lr=5e-4, schedule="step", lr_drop_epoch=15, scale_lr=False, weight_decay=1e-4, warmup_epochs=0,
                  checkpoint_every=500)
DETR_FT_PAPER = dict(DETR_PAPER, epochs=200, lr=1e-5, lr_drop_epoch=150)
DETR_FT_SMALL = dict(DETR_SMALL, lr=1e-4)


def crop(args):
    return data.train_transform("crop", size=args.image_size)


def whole(args):
    return data.eval_transform("classify", size=args.image_size, crop_ratio=1.0)


def detect(args):
    return data.train_transform("detect", size=args.image_size)


def resize(args):
    return data.eval_transform("detect", size=args.image_size)


TASKS: dict[str, Task] = {
    "finola": Task(build_finola, finola_loss, crop, whole, evaluate_finola,
                   {"small": FINOLA_SMALL, "paper": FINOLA_PAPER}, "reconstruct --grid reconstructions.png"),
    "detr-probe": Task(build_detr, detr_loss, detect, resize, evaluate_detr, {"small": DETR_SMALL, "paper": DETR_PAPER},
                       "detect --figure detections.png"),
    "detr-finetune": Task(build_detr, detr_loss, detect, resize, evaluate_detr,
                          {"small": DETR_FT_SMALL, "paper": DETR_FT_PAPER}, "detect --figure detections.png"),
}
