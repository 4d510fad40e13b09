"""The table of experiments: one row per ``train.py --task``.

A task says how to build its model (from the parsed flags), its loss on a batch, its training transform (and the same
without augmentation for ``--no-augment``), its final evaluation, and its presets: ``small`` (minutes on a CPU, on
data that ships with the packages) and ``paper`` (the paper's appendix). ``train.py`` owns the flags and the one loop.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

import analysis
import augment
import autoencoder
import classify
import data
import detection
import detr
import mae
import masked
import metrics
import mobileformer
import weights


@dataclass
class Task:
    build: Callable      # args -> model (one of weights.architectures())
    loss: Callable       # (model, batch, args) -> scalar loss
    transform: Callable  # args -> training transform (augment.train_transform kind)
    evaluation: str      # its final evaluation (metrics.EVALUATIONS), also ``eval.py``'s command for its weights
    presets: dict        # preset name -> flag defaults
    frozen: bool = False  # the encoder stays frozen (the probes)


def unaugmented(task: Task, args):
    """The training transform without augmentation (--no-augment): the task's evaluation transform."""
    return metrics.EVALUATIONS[task.evaluation].transform(None, vars(args))


def evaluate(task: Task, model, args, out: Path, *, bad: data.BadImages | None = None) -> dict:
    """The task's final evaluation of ``model`` on --eval-split of --data (main process), its figure in ``out``;
    unreadable images counted in ``bad``."""
    loader = metrics.evaluation_loader(task.evaluation, model, source=args.data, split=args.eval_split,
                                       options=args.data_options, train=vars(args), batch_size=args.batch_size, bad=bad)
    return metrics.evaluate(task.evaluation, model, loader, out=out, train=vars(args), bad=bad)


def encoder_of(args):
    """The encoder a run starts from: the one of --init (any of our files), or a fresh --encoder (a ViT's patch side:
    --image-size / --grid)."""
    if args.init:
        return weights.load_encoder(args.init)
    if args.encoder in mae.PRESETS:
        if args.image_size % args.grid:
            raise ValueError(f"--image-size {args.image_size} must be a multiple of --grid {args.grid} for a ViT "
                             "(its patch side)")
        return mae.create(args.encoder, patch=args.image_size // args.grid)
    return mobileformer.create(args.encoder, zero_init_residual=args.zero_init_residual,
                               down_shortcut=args.down_shortcut, final_act=args.final_act)


def map_size(encoder, image_size: int) -> tuple[int, int]:
    """The (h, w) of ``encoder``'s output map for ``image_size``² images (one forward of a blank image)."""
    mode = encoder.training
    with torch.no_grad():
        fmap, _ = encoder.eval()(torch.zeros(1, 3, image_size, image_size))
    encoder.train(mode)
    return tuple(fmap.shape[-2:])


def build_finola(args):
    encoder = encoder_of(args)
    if args.upsampler == "linear" and args.image_size % args.grid:
        raise ValueError(f"--image-size {args.image_size} must be a multiple of --grid {args.grid} for --upsampler "
                         "linear (each cell decodes a patch of image size / grid pixels)")
    config = autoencoder.FinolaConfig(
        channels=args.channels, paths=args.paths, grid=(args.grid, args.grid), q_position=args.q_position,
        norm=args.norm, upsampler=args.upsampler, widths=tuple(args.widths), patch=args.image_size // args.grid,
        output=args.output, pool_positions=map_size(encoder, args.image_size) if args.pool_positions else ())
    # App. D (--freeze-encoder): a pre-trained encoder, frozen; pooling, FINOLA and a fresh upsampler are trained
    model = autoencoder.Finola(encoder.freeze(args.freeze_encoder), config)
    if model.image_size != (args.image_size, args.image_size):
        raise ValueError(f"--image-size {args.image_size} must equal --grid {args.grid} x 2^(len(--widths) - 1) "
                         f"= {model.image_size[0]}")
    if args.spectral_loss:  # the PCA baseline's crops: the directions and variances the loss weighs
        if args.spectral_loss >= 1:
            raise ValueError(f"--spectral-loss {args.spectral_loss}: expected a number in [0, 1) "
                             "(autoencoder.SpectralMSE)")
        if not args.pca_images:
            raise ValueError("--spectral-loss weighs the error by the PCA baseline's principal directions: it needs "
                             "--pca-images > 0 (or --spectral-loss 0)")
        try:
            pca = metrics.pca_baseline(model, args.data, args.data_options, n=args.pca_images)
        except analysis.PCATooLarge as error:
            raise ValueError(f"--spectral-loss needs a PCA of the training images: {error}") from None
        model.criterion = autoencoder.SpectralMSE(pca, args.spectral_loss)
    return model


def finola_loss(model, batch, args):
    """Pixel MSE over the whole image (§2); with --spectral-loss, weighted along the training crops' principal
    directions (``autoencoder.SpectralMSE``, which ``build_finola`` attaches as ``model.criterion``)."""
    x = batch["images"]
    criterion = getattr(getattr(model, "module", model), "criterion", None)  # through a DDP wrapper too
    return F.mse_loss(model(x), x) if criterion is None else criterion(model(x), x)


FINOLA_PAPER = dict(data="hf:ILSVRC/imagenet-1k", streaming=True, epoch_size=1_281_167, encoder="mf-w2880",
                    channels=3072, grid=16, image_size=256, upsampler="conv", widths=[512, 256, 256, 128, 128],
                    batch_size=128,
                    epochs=100, warmup_epochs=10, lr=1.5e-4, weight_decay=0.1, betas=[0.9, 0.95], checkpoint_every=2000)
# Ours: the 7 photos + 42 wallpapers at 32², a 4x4 grid of 8 px patches, mf-nano (Mobile-Former cut to its three M-F↓
# blocks: at this size a step of the 12-block mf-tiny costs more and teaches less, EXPERIMENTS.md), 80 epochs
# (4-5 minutes here, as this machine's speed moves), no colour jitter (it cost 0.26-0.46 dB at 60
# epochs, once the encoder was the shallow one; EXPERIMENTS.md), and no ReLU6 after the encoder's final conv (+0.6-0.7
# dB at 80 epochs on two seeds; the paper does not say whether it is there; EXPERIMENTS.md), and learned key positions
# in the pooler (+0.19-0.29 dB at 80 epochs on two seeds: the encoder's 2x2 map no longer has to say where it is),
# and the loss weighted along the training crops' principal directions with alpha 0.25 (+0.24-0.26 dB at 80 epochs on
# two seeds: the low-variance directions q must also hold are learnt sooner; 0.4 lost 0.18 dB; at 360 epochs the plain
# MSE catches up: +0.04-0.09 dB), and Muon on the weight matrices and kernels (muon.py) at a batch of 128, where
# AdamW loses: +1.4 dB at 80 epochs in 4-5 minutes instead of 6-8 (EXPERIMENTS.md, "Seventh pass").
FINOLA_SMALL = dict(data="photos", encoder="mf-nano", zero_init_residual=True, final_act=False, pool_positions=True,
                    spectral_loss=0.25,
                    channels=256, grid=4, image_size=32, upsampler="linear", colour_jitter=0.0, batch_size=128,
                    optimizer="muon", epochs=80, warmup_epochs=0.5, lr=2.4e-2, weight_decay=0.1, betas=[0.9, 0.95],
                    checkpoint_every=200)


def decoder_of(args, choices) -> str:
    """--decoder, which must be one of ``choices`` (the decoders this task puts on its encoder)."""
    if args.decoder not in choices:
        raise ValueError(f"--decoder {args.decoder}: --task {args.task} takes one of {sorted(choices)}")
    return args.decoder


def build_detr(args):
    """DETR with a Mobile-Former decoder on a backbone from --init (any of our files) or a fresh --encoder. From a
    DETR file the whole detector continues (App. C: fine-tuning follows the decoder probe), its backbone trainable
    for detr-finetune; from any other file only its encoder is taken."""
    num_classes = max(data.categories(data.load(args.data, split="train", **args.data_options))) + 1
    frozen = TASKS[args.task].frozen
    if args.init and weights.read_metadata(args.init)["model"].get("arch") == "detr":
        model = weights.load_model(args.init)
        if model.config.num_classes != num_classes:
            raise ValueError(f"--init {args.init!r}: a detector of {model.config.num_classes} classes, but --data "
                             f"{args.data!r} has {num_classes}")
        return model.freeze_encoder(frozen).train()
    return detr.create(encoder_of(args), decoder=decoder_of(args, detr.PRESETS), num_classes=num_classes,
                       num_queries=args.num_queries, frozen=frozen, position_layout=args.position_layout,
                       reference_boxes=args.reference_boxes, class_loss=args.class_loss, denoising=args.denoising)


def detr_loss(model, batch, args):
    """DETR's set criterion on every decoder layer (CE, no-object weight 0.1; L1 x5; GIoU x2), or with --class-loss
    focal Deformable DETR's class term (detection.SetCriterion)."""
    outputs = model(batch["images"], batch.get("mask"), batch["targets"])    # targets: for denoising queries
    config = getattr(model, "module", model).config   # through a DDP wrapper too
    criterion = detection.SetCriterion.for_model(config).to(outputs["pred_logits"].device)  # no parameters, no state
    return criterion(outputs, batch["targets"])["loss"]


# App. C: AdamW, weight decay 1e-4, 2 images x 8 GPUs (a global batch of 16); probe 500 epochs at 1e-4 (x0.1 after
# 400), fine-tune 200 epochs at 1e-5 (x0.1 after 150). DETR's lr is not scaled with the batch; DETR clips the gradient
# norm at 0.1 (its default, which the paper does not change). --image-size is the evaluation resize's shorter side
# (DETR's 800, longer side <= 1333); training draws DETR's sizes scaled by image_size / 800 (augment.DetrResize).
DETR_PAPER = dict(data="hf:detection-datasets/coco", encoder="mf-w2880", decoder="mf-dec-522", image_size=800,
                  batch_size=16, clip_grad=0.1, epochs=500, lr=1e-4, schedule="step", lr_drop_epoch=400, scale_lr=False,
                  weight_decay=1e-4, warmup_epochs=0, checkpoint_every=5000)
DETR_FT_PAPER = dict(DETR_PAPER, epochs=200, lr=1e-5, lr_drop_epoch=150)
# Ours: shapes at 128 (shorter sides 77..128 in training), 10 queries (at most 3 objects an image), and three remedies
# for DETR's slow start that change training, not the detector's inference (EXPERIMENTS.md, Detectors that detect):
# reference boxes (a box per query that steers its attention, refined block by block), the sigmoid focal loss (which
# measured worse than softmax CE at 3,000 steps: --class-loss ce; EXPERIMENTS.md) and 5 groups of denoising queries.
# The probe: 60 epochs (7,500 steps), x0.1 after 48. The fine-tune starts from a FINOLA file's encoder and a fresh
# decoder (or continues a probe): 30 epochs at the probe's lr, x0.1 after 24.
DETR_SMALL = dict(data="shapes", encoder="mf-tiny", decoder="mf-dec-tiny", image_size=128, num_queries=10,
                  reference_boxes=True, class_loss="focal", denoising=5, batch_size=16, clip_grad=0.1, epochs=60,
                  lr=5e-4, schedule="step", lr_drop_epoch=48, scale_lr=False, weight_decay=1e-4, warmup_epochs=0,
                  checkpoint_every=500)
DETR_FT_SMALL = dict(DETR_SMALL, epochs=30, lr_drop_epoch=24)


# --- Masked FINOLA pre-training (§3, Tables 10, 12) -----------------------------------------------------------------

def build_masked(args):
    """Masked-FINOLA-E or -B on a fresh --encoder (or one from --init); patches of --image-size / --grid pixels."""
    encoder = encoder_of(args)
    if args.image_size % args.grid:
        raise ValueError(f"--image-size {args.image_size} must be a multiple of --grid {args.grid} (the patch size)")
    common = dict(channels=args.channels, grid=(args.grid, args.grid), patch=args.image_size // args.grid)
    if args.task == "masked-e":
        return masked.MaskedFinolaE(encoder, masked.MaskedEConfig(**common))
    if args.image_size != 16 * args.grid:
        raise ValueError(f"--image-size {args.image_size} must be 16 x --grid {args.grid} for masked-b: the block's "
                         "1/16 encoder features are its cells of the map")
    config = masked.MaskedBConfig(**common, width=args.upsampler_width, depth=args.upsampler_depth,
                                  heads=max(2, args.upsampler_width // 64))
    return masked.MaskedFinolaB(encoder, config)


def masked_loss(model, batch, args):
    """§3: pixel MSE on the masked region only; the model draws one floating block per image."""
    x = batch["images"]
    prediction, mask = model(x)
    return masked.masked_mse(prediction, x, mask)


# Table 12: AdamW 1.5e-4 x batch / 256, wd 0.1, batch 1024, 1600 epochs, 10 warm-up, 256^2, RandomResizedCrop.
MASKED_E_PAPER = dict(data="hf:ILSVRC/imagenet-1k", streaming=True, epoch_size=1_281_167, encoder="mf-w2880",
                      channels=3072, grid=16, image_size=256, batch_size=1024, epochs=1600, warmup_epochs=10,
                      lr=1.5e-4, weight_decay=0.1, betas=[0.9, 0.95], checkpoint_every=1000)
MASKED_B_PAPER = dict(MASKED_E_PAPER, channels=None, upsampler_width=512, upsampler_depth=6)
# Ours: fashion-mnist at 64^2 (blocks of 32^2, the smallest input mf-tiny takes), a 4 x 4 grid of 16 px patches,
# 600 steps of 32 (a third of an epoch: no augmentation); a 2-block, 128-wide transformer upsampler for -B.
MASKED_E_SMALL = dict(data="fashion-mnist", augment=False, encoder="mf-tiny", channels=256, grid=4, image_size=64,
                      batch_size=32, epochs=1, max_steps=600, warmup_epochs=0.03, lr=8e-3, weight_decay=0.1,
                      betas=[0.9, 0.95], checkpoint_every=500)
MASKED_B_SMALL = dict(MASKED_E_SMALL, channels=None, upsampler_width=128, upsampler_depth=2)


# --- MAE, the masked-image-modelling baseline (Table 6) --------------------------------------------------------------

def build_mae(args):
    """MAE on a fresh ViT --encoder (patches of --image-size / --grid pixels) or the ViT of --init; its decoder is
    --decoder-width wide (width / 32 heads, as MAE's 512 / 16 and MAE-Lite's 96 / 3) and --decoder-depth deep."""
    encoder = encoder_of(args)
    if not isinstance(encoder, mae.ViT):
        raise ValueError(f"--encoder: MAE pre-trains a ViT ({sorted(mae.PRESETS)}), got {type(encoder).__name__}")
    config = mae.MAEConfig(mask_ratio=args.mask_ratio, decoder_width=args.decoder_width,
                           decoder_depth=args.decoder_depth, decoder_heads=max(1, args.decoder_width // 32))
    return mae.MAE(encoder, config)


def mae_loss(model, batch, args):
    """MSE on the removed patches, each normalized by its own mean and variance (MAE's norm_pix_loss)."""
    return mae.loss(*model(batch["images"]))


# MAE-Lite's ViT-Tiny recipe (MAE leaves tiny models open): 224^2, patch 16, 75 % masked, AdamW (0.9, 0.95) wd 0.05,
# lr 1.5e-4 x batch / 256 at batch 4096, 400 epochs with 40 of warm-up, RandomResizedCrop (0.08, 1) + flip.
MAE_PAPER = dict(data="hf:ILSVRC/imagenet-1k", streaming=True, epoch_size=1_281_167, encoder="vit-tiny", grid=14,
                 image_size=224, mask_ratio=0.75, decoder_width=96, decoder_depth=1, batch_size=4096, epochs=400,
                 warmup_epochs=40, lr=1.5e-4, weight_decay=0.05, betas=[0.9, 0.95], checkpoint_every=1000)
# Ours: the masked FINOLA small presets' data, budget and optimiser, on 8 x 8 patches of 64^2 (16 of 64 seen).
MAE_SMALL = dict(MASKED_E_SMALL, encoder="vit-tiny", grid=8, mask_ratio=0.75, decoder_width=96, decoder_depth=1)


# --- Classification: probing, fine-tuning and the supervised baseline (App. B, Tables 13-14) -------------------------

def build_classifier(args):
    """An encoder from --init (random when absent; from scratch for ``supervised``) and a --decoder (lin, tran-1,
    tran-4). finetune from a classifier file with the same --decoder also starts its decoder there (App. C: from the
    tran-1 probe)."""
    if args.task == "supervised" and args.init:
        raise ValueError("--init: the supervised baseline trains its encoder from scratch; use --task finetune")
    ds = data.load(args.data, split="train", streaming=args.streaming, **args.data_options)
    encoder = encoder_of(args)
    config = classify.ClassifierConfig(num_classes=max(data.categories(ds)) + 1,
                                       decoder=decoder_of(args, classify.DECODERS), dropout=args.dropout, frozen=TASKS[args.task].frozen,
                                       feature_norm=args.feature_norm)
    model = classify.Classifier(encoder, config)
    if args.task == "finetune" and args.init:
        probe = weights.load_model(args.init)
        same = probe.metadata["model"]["arch"] == "classifier" and all(
            getattr(probe.config, k) == getattr(model.config, k) for k in ("decoder", "width", "num_classes"))
        if same:
            decoder = {k: v for k, v in probe.state_dict().items() if not k.startswith("encoder.")}
            model.load_state_dict(decoder, strict=False)
    return model


def classify_loss(model, batch, args):
    """Cross-entropy with --label-smoothing (0.1 for tran-1 probing, Table 13)."""
    return F.cross_entropy(model(batch["images"]), batch["labels"], label_smoothing=args.label_smoothing)


IMAGENET = dict(data="hf:ILSVRC/imagenet-1k", streaming=True, epoch_size=1_281_167, encoder="mf-w2880",
                image_size=224, checkpoint_every=2000)
# Table 13. SGD's momentum is 0.9 (not stated; MAE's linear probe uses LARS with it). Dropout comes per width
# (classify.WIDTHS); random erasing is 0.25 for the default MF-W2880 (0 for W720 / W1440: pass --random-erase 0).
LINPROBE_PAPER = dict(IMAGENET, decoder="lin", optimizer="sgd", lr=0.1, weight_decay=0.0, batch_size=4096, epochs=90,
                      warmup_epochs=10)
TRAN1_PAPER = dict(IMAGENET, decoder="tran-1", lr=5e-4, weight_decay=0.1, batch_size=4096, epochs=200, warmup_epochs=10,
                   label_smoothing=0.1, random_erase=0.25)
# Table 14's body is missing from our copy of the paper; what it does not give follows MAE's fine-tuning recipe
# (AdamW 5e-4 x batch / 256, wd 0.05, batch 1024, 100 epochs, 5 warm-up, RandAug(9, 0.5), label smoothing 0.1,
# random erasing 0.25 as the paper's row for MF-W2880); dropout per width as Table 13.
FINETUNE_PAPER = dict(IMAGENET, decoder="tran-1", lr=5e-4, weight_decay=0.05, batch_size=1024, epochs=100,
                      warmup_epochs=5, label_smoothing=0.1, random_erase=0.25)
SUPERVISED_PAPER = dict(FINETUNE_PAPER, epochs=300, warmup_epochs=20)  # not in the paper: DeiT's length
# Ours: fashion-mnist at 64^2, mf-tiny, no augmentation (under one epoch), the labels of the 60k training images.
CLASSIFY_SMALL = dict(data="fashion-mnist", augment=False, encoder="mf-tiny", image_size=64, crop_ratio=1.0,
                      batch_size=128, epochs=1, max_steps=300, warmup_epochs=0.05, checkpoint_every=500)
LINPROBE_SMALL = dict(CLASSIFY_SMALL, decoder="lin", optimizer="sgd", lr=0.1, weight_decay=0.0)
# --feature-norm (ours): the map's channels standardized before tran-1's embedding, as the linear probe's BatchNorm
# does; without it a random mf-tiny's tokens hold far more of what every image shares than of what differs between
# images, and tran-1 stays near chance (EXPERIMENTS.md, tran-1 that learns).
TRAN1_SMALL = dict(CLASSIFY_SMALL, decoder="tran-1", lr=2e-3, weight_decay=0.1, label_smoothing=0.1, feature_norm=True)
FINETUNE_SMALL = dict(TRAN1_SMALL, lr=1e-3, weight_decay=0.05)
SUPERVISED_SMALL = dict(FINETUNE_SMALL, lr=4e-3, max_steps=600)


def train_crops(args):
    return augment.train_transform("crop", size=args.image_size, colour=args.colour_jitter)


def train_randaug(args):
    return augment.train_transform("randaug", size=args.image_size, erase=args.random_erase)


def train_detect(args):
    return augment.train_transform("detect", size=args.image_size)


# what the tasks of one family share: build, loss, training transform, evaluation
FINOLA = (build_finola, finola_loss, train_crops, "reconstruct")
DETR = (build_detr, detr_loss, train_detect, "detect")
MASKED = (build_masked, masked_loss, train_crops, "masked")
MAE = (build_mae, mae_loss, train_crops, "mae")
CLASSIFY = (build_classifier, classify_loss, train_randaug, "classify")
LINEAR = (build_classifier, classify_loss, train_crops, "classify")  # Table 13: crops, no RandAug

TASKS: dict[str, Task] = {
    "finola": Task(*FINOLA, {"small": FINOLA_SMALL, "paper": FINOLA_PAPER}),
    "detr-probe": Task(*DETR, {"small": DETR_SMALL, "paper": DETR_PAPER}, frozen=True),
    "detr-finetune": Task(*DETR, {"small": DETR_FT_SMALL, "paper": DETR_FT_PAPER}),
    "masked-e": Task(*MASKED, {"small": MASKED_E_SMALL, "paper": MASKED_E_PAPER}),
    "masked-b": Task(*MASKED, {"small": MASKED_B_SMALL, "paper": MASKED_B_PAPER}),
    "mae": Task(*MAE, {"small": MAE_SMALL, "paper": MAE_PAPER}),
    "linprobe": Task(*LINEAR, {"small": LINPROBE_SMALL, "paper": LINPROBE_PAPER}, frozen=True),
    "tran1-probe": Task(*CLASSIFY, {"small": TRAN1_SMALL, "paper": TRAN1_PAPER}, frozen=True),
    "finetune": Task(*CLASSIFY, {"small": FINETUNE_SMALL, "paper": FINETUNE_PAPER}),
    "supervised": Task(*CLASSIFY, {"small": SUPERVISED_SMALL, "paper": SUPERVISED_PAPER}),
}
