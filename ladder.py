"""The reconstruction ladder: from the simplest model of the paper's design that could reconstruct to the full small
preset, one component at a time, each trained for the same wall-clock on the same cached crops (EXPERIMENTS.md).

    python ladder.py [--minutes 3] [--rungs linear/linear/normalized mf/table10/normalized ...] [--data photos]

A rung is ENCODER/DECODER/OUTPUT around the same FINOLA recurrence (``autoencoder.Finola``, q at the centre of a
``--grid`` map), or around no recurrence at all:
  encoder  ``linear``: one linear layer on the normalized pixels, seen by the attentional pooler as a 1x1 map (a
           pooler over one position is linear, so the whole encoder is linear); ``mf``: ``--encoder`` (mf-tiny) and
           the attentional pooler, with Mobile-Former's own initialisation; ``mf0``: the same with its residual
           branches zero-initialised (``--zero-init-residual``, the small preset).
  decoder  ``linear``: Table 10's linear layer (each cell's C channels to its patch, ``finola.LinearUpsampler``);
           ``table10``: Table 10's conv upsampler with ``--widths``. Without FINOLA: ``q-linear``, one linear
           layer from q to the image (does the recurrence slow learning?); ``pca``, no decoder to learn: q is read
           as the coefficients of the training crops' PCA of as many components (OUTPUT ``pixels``), so the encoder
           regresses the best linear code of q's size (distillation towards the PCA).
  output   what the decoder predicts (``autoencoder.OUTPUTS``): ``pixels`` or ``normalized``.
Training crops are drawn once by the task's training transform (``augment.train_transform("crop")``) and cached, so
every rung spends its minutes on the model; held-out PSNR is on the evaluation split, next to the mean colour.
Ends with one JSON line.
"""
from __future__ import annotations

import argparse
import json
import math
import time

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import Progress
from rich.table import Table
from torch import nn

import analysis
import augment
import autoencoder
import data
import metrics
import mobileformer
import muon
import tasks
from finola import AttentionPool
from layers import PixelNorm

console = Console(stderr=True)
DECODERS = ("linear", "table10", "q-linear", "pca")
DEFAULT_RUNGS = ("linear/linear/pixels", "linear/linear/normalized", "linear/table10/normalized",
                 "mf/linear/normalized", "mf0/linear/normalized", "mf0/table10/normalized", "mf/table10/pixels")


class LinearEncoder(nn.Module):
    """One linear layer from the pixels to ``out_channels`` numbers, returned as a 1x1 map (and no tokens)."""

    def __init__(self, image_size: int, out_channels: int):
        super().__init__()
        self.out_channels = out_channels
        self.linear = nn.Linear(3 * image_size * image_size, out_channels)

    def forward(self, x):
        return self.linear(x.flatten(1))[:, :, None, None], None


class WithoutFinola(nn.Module):
    """Encoder → attentional pooling → q → ``decoder`` (q (B, C) → (B, 3·H·W)) → the image; ``output`` as in
    ``autoencoder.OUTPUTS``."""

    def __init__(self, encoder: nn.Module, channels: int, image_size: int, decoder: nn.Module, *, output: str):
        super().__init__()
        self.encoder, self.decoder, self.output, self.size = encoder, decoder, output, (image_size, image_size)
        self.pool = AttentionPool(encoder.out_channels, channels, heads=autoencoder.FinolaConfig.heads)
        self.pixels = PixelNorm()

    def forward(self, x):
        fmap, _ = self.encoder(self.pixels(x, size=self.size))
        y = self.decoder(self.pool(fmap)).view(-1, 3, *self.size)
        return self.pixels.inverse(y) if self.output == "normalized" else y


class PCADecoder(nn.Module):
    """A fixed decoder: mean + basis · q, with ``pca`` from ``analysis.fit_pca`` (nothing to train)."""

    def __init__(self, pca: dict):
        super().__init__()
        self.register_buffer("mean", pca["mean"].float())
        self.register_buffer("basis", pca["basis"].float())

    def forward(self, q):
        return torch.addmm(self.mean, q, self.basis.T)


def build(rung: str, args, pca: dict | None = None) -> nn.Module:
    """The rung's model; ``pca`` (``analysis.fit_pca`` of ``--channels`` components): for the ``pca`` decoder."""
    encoder_kind, decoder_kind, output = rung.split("/")
    encoder = (LinearEncoder(args.image_size, args.channels) if encoder_kind == "linear"
               else mobileformer.create(args.encoder, zero_init_residual=encoder_kind == "mf0",
                                        final_act=args.final_act))
    if decoder_kind in ("q-linear", "pca"):
        decoder = nn.Linear(args.channels, 3 * args.image_size ** 2) if decoder_kind == "q-linear" else PCADecoder(pca)
        model = WithoutFinola(encoder, args.channels, args.image_size, decoder, output=output)
        return model.to(memory_format=torch.channels_last)
    positions = tasks.map_size(encoder, args.image_size) if args.pool_positions else ()
    config = autoencoder.FinolaConfig(channels=args.channels, grid=(args.grid, args.grid), pool_positions=positions,
                                 upsampler="linear" if decoder_kind == "linear" else "conv",
                                 widths=tuple(args.widths), patch=args.image_size // args.grid, output=output)
    return autoencoder.Finola(encoder, config).to(memory_format=torch.channels_last)


def crops(args) -> tuple[torch.Tensor, torch.Tensor]:
    """``--crops`` training crops drawn by the training transform (seed 0) and the evaluation images, as uint8."""
    train = data.Loader(data.load(args.data, split="train"), batch_size=256, shuffle=True, seed=0,
                        transform=augment.train_transform("crop", size=args.image_size))
    out, epoch = [], 0
    with Progress(console=console) as progress:
        task = progress.add_task("drawing training crops", total=args.crops)
        while sum(map(len, out)) < args.crops:
            train.set_epoch(epoch)
            before = sum(map(len, out))
            for batch in train:
                out.append((batch["images"] * 255).round().to(torch.uint8))
                progress.update(task, completed=min(args.crops, sum(map(len, out))))
                if sum(map(len, out)) >= args.crops:
                    break
            if sum(map(len, out)) == before:  # every image unreadable: more epochs would never end
                raise ValueError(f"--data {args.data!r}: the training split gave no readable images")
            epoch += 1
    val = data.Loader(data.load(args.data, split="validation"), batch_size=256,
                      transform=augment.eval_transform("classify", size=args.image_size, crop_ratio=1.0))
    val = [b["images"] for b in val]
    if not val:
        raise ValueError(f"--data {args.data!r}: the validation split gave no readable images")
    return torch.cat(out)[: args.crops], torch.cat(val)


def train_rung(rung: str, x_train: torch.Tensor, x_val: torch.Tensor, args, pca: dict | None = None) -> dict:
    """AdamW (0.9, 0.95) (``--optimizer muon``: Muon on matrices), wd 0.1 on matrices, linear warm-up over
    ``--warmup`` steps then cosine decay over the ``--minutes`` of wall-clock, on the pixel MSE (with
    ``--spectral-loss``, weighted along ``pca``'s directions); returns PSNR on the evaluation images and on 512
    training crops."""
    torch.manual_seed(args.seed)
    model = build(rung, args, pca)
    criterion = autoencoder.SpectralMSE(pca, args.spectral_loss) if args.spectral_loss else F.mse_loss
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    optimizer = (muon.Muon(groups, lr=args.lr, betas=(0.9, 0.95)) if args.optimizer == "muon" else
                 torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95)))
    g = torch.Generator().manual_seed(args.seed)
    budget, step, start = 60 * args.minutes, 0, time.perf_counter()
    model.train()
    while (elapsed := time.perf_counter() - start) < budget:
        lr = args.lr * min(1.0, (step + 1) / args.warmup) * 0.5 * (1 + math.cos(math.pi * elapsed / budget))
        for group in optimizer.param_groups:
            group["lr"] = lr
        x = x_train[torch.randint(512, len(x_train), (args.batch_size,), generator=g)].float().div(255)
        loss = criterion(model(x.contiguous(memory_format=torch.channels_last)), x)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
    model.eval()
    with torch.no_grad():
        seen = x_train[:512].float().div(255)  # held out of training too: the first 512 crops are never drawn
        return {"rung": rung, "steps": step, "seconds": round(time.perf_counter() - start, 1),
                "psnr_db": round(metrics.psnr(x_val, model(x_val)).mean().item(), 2),
                "train_crops_psnr_db": round(metrics.psnr(seen, model(seen)).mean().item(), 2)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rungs", nargs="+", default=list(DEFAULT_RUNGS), help="ENCODER/DECODER/OUTPUT, see above")
    p.add_argument("--minutes", type=float, default=3.0, help="wall-clock of each rung's training")
    p.add_argument("--data", default="photos")
    p.add_argument("--crops", type=int, default=20000, help="cached training crops (the first 512 are held out)")
    p.add_argument("--encoder", default="mf-tiny", choices=sorted(mobileformer.PRESETS))
    p.add_argument("--final-act", action=argparse.BooleanOptionalAction, default=True,
                   help="ReLU6 after the Mobile-Former's final conv (train.py's flag; off in the small finola preset)")
    p.add_argument("--pool-positions", action=argparse.BooleanOptionalAction, default=False,
                   help="learned key positions in the pooler of the FINOLA rungs (train.py's flag; on in the small "
                        "finola preset)")
    p.add_argument("--spectral-loss", type=float, default=0.0, metavar="ALPHA",
                   help="weigh the error along the crops' leading --channels principal directions (train.py's flag, "
                        "autoencoder.SpectralMSE; 0: plain MSE)")
    p.add_argument("--optimizer", choices=["adamw", "muon"], default="adamw",
                   help="muon: Muon on the weight matrices and kernels, AdamW on the vectors (train.py's flag, "
                        "muon.py)")
    p.add_argument("--channels", type=int, default=256)
    p.add_argument("--grid", type=int, default=4)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--widths", type=int, nargs="+", default=[64, 32, 32, 16])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=30, help="warm-up steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = p.parse_args(argv)
    for rung in args.rungs:
        parts = rung.split("/")
        if len(parts) != 3 or parts[0] not in ("linear", "mf", "mf0") or parts[1] not in DECODERS \
                or parts[2] not in autoencoder.OUTPUTS or (parts[1] == "pca" and parts[2] != "pixels"):
            p.error(f"--rungs: {rung!r} is not ENCODER/DECODER/OUTPUT with ENCODER in linear|mf|mf0, DECODER in "
                    f"{'|'.join(DECODERS)}, OUTPUT in {'|'.join(autoencoder.OUTPUTS)} (pixels for pca)")
    if args.threads:
        torch.set_num_threads(args.threads)
    x_train, x_val = crops(args)
    pca = None
    if args.spectral_loss or any(rung.split("/")[1] == "pca" for rung in args.rungs):  # on the crops they train on
        pca = analysis.fit_pca((x_train[i:i + 1024].float().div(255) for i in range(512, len(x_train), 1024)),
                               args.channels, max_images=len(x_train))
    mean_colour = round(metrics.psnr(x_val, metrics.mean_colour(x_val)).mean().item(), 2)
    results = []
    for rung in args.rungs:
        console.print(f"training {rung} for {args.minutes:g} min")
        results.append(train_rung(rung, x_train, x_val, args, pca))
        console.print(results[-1])
    table = Table(title=f"Reconstruction ladder: {args.minutes:g} min each on {args.data} at {args.image_size}², "
                        f"C = {args.channels}, {args.grid}x{args.grid}; mean colour {mean_colour} dB held out")
    for col in ("encoder / decoder / output", "steps", "held-out PSNR", "vs mean colour", "training crops PSNR"):
        table.add_column(col, justify="right")
    for r in results:
        table.add_row(r["rung"], str(r["steps"]), f"{r['psnr_db']:.2f} dB", f"{r['psnr_db'] - mean_colour:+.2f}",
                      f"{r['train_crops_psnr_db']:.2f} dB")
    console.print(table)
    out = {"mean_colour_db": mean_colour, "minutes": args.minutes, "rungs": results}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    import errors

    errors.run(main)
