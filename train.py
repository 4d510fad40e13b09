"""One training script for every experiment of the paper, chosen by flags:

    accelerate launch train.py --task finola [--preset small|paper] [--data SOURCE] [--out DIR] [--max-steps N] ...

A task is a row of ``tasks.TASKS``: how to build its model, its loss on a batch, its data transform and its final
evaluation. ``--preset`` fills every flag the command line leaves unset (``small``: minutes on a laptop CPU;
``paper``: the paper's appendix, Table 12 for ``finola``). One loop (nanoGPT-style) serves all tasks: AdamW (SGD
for linear probing), linear warm-up then cosine decay of lr = base_lr x global batch / 256 (App. C), Accelerate for
devices, processes, mixed precision and gradient accumulation, atomic checkpoints of the full training state,
``--resume``, ``metrics.jsonl`` and a final ``model.safetensors`` whose metadata rebuilds the model
(``weights.load_model``).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import itertools
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

import autoencoder
import classify
import detection
import data
import detr
import errors
import finola
import mae
import mobileformer
import muon
import runs
import weights
import tasks
from tasks import TASKS

console = Console(stderr=True)


# Flags every task understands, with the value used when neither the command line nor the preset sets them.
DEFAULTS = dict(preset="small", data=None, streaming=False, augment=True, epoch_size=None, eval_split="validation",
                data_options={}, encoder="mf-tiny", channels=256, paths=1, grid=4, image_size=32, upsampler="conv",
                widths=[64, 32, 32, 16], q_position="center", norm="layer", decoder="mf-dec-tiny", num_queries=100,
                position_layout="heads", reference_boxes=False, class_loss="ce", denoising=0,
                feature_norm=False, init=None,
                batch_size=32, epochs=1, max_steps=None, warmup_epochs=0.0, lr=1.5e-4, scale_lr=True,
                schedule="cosine", lr_drop_epoch=None, betas=[0.9, 0.999], weight_decay=0.1, grad_accum=1, seed=0, num_workers=0,
                out=None, resume=None, checkpoint_every=500, log_every=10, freeze_encoder=False,
                upsampler_width=512, upsampler_depth=6, decoder_width=96, decoder_depth=1, mask_ratio=0.75, dropout=None,
                optimizer="adamw",
                label_smoothing=0.0, random_erase=0.0, crop_ratio=0.875, threads=None, pca_images=20000,
                output="normalized", zero_init_residual=False, down_shortcut=False, final_act=True, pool_positions=False, spectral_loss=0.0, colour_jitter=0.0, clip_grad=0.0, compile=False)


def _number(kind, low: float, *, low_ok: bool, what: str):
    """An argparse type: ``kind`` (int or float) above ``low`` (or equal with ``low_ok``), named in the error."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not (value >= low if low_ok else value > low) or value != value:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
        return value
    return parse


POSITIVE = _number(int, 0, low_ok=False, what="a positive integer")
COUNT = _number(int, 0, low_ok=True, what="an integer >= 0")
RATE = _number(float, 0, low_ok=False, what="a number > 0")
AMOUNT = _number(float, 0, low_ok=True, what="a number >= 0")
# Flags a resumed run may change: they steer the run, not what it computes (see parse_args).
RESUMABLE = ("max_steps", "checkpoint_every", "log_every", "threads", "num_workers", "log_with")
# Experiment trackers Accelerate logs to (--log-with), each an optional install: name -> (module, pip package).
TRACKERS = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"), "mlflow": ("mlflow", "mlflow"),
            "comet_ml": ("comet_ml", "comet-ml"), "aim": ("aim", "aim"), "clearml": ("clearml", "clearml"),
            "dvclive": ("dvclive", "dvclive")}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, argument_default=None,
        epilog="Tasks: " + ", ".join(TASKS) + ". Presets: " + "; ".join(
            f"{t}/{n}: " + ", ".join(f"{k}={v}" for k, v in d.items()) for t, task in TASKS.items()
            for n, d in task.presets.items()))
    p.add_argument("--task", choices=sorted(TASKS), help="the experiment (required unless --resume)")
    p.add_argument("--preset", choices=["small", "paper"], help="defaults for every unset flag (default: small)")
    for flags in (_data_flags, _model_flags, _decoder_flags, _optimisation_flags, _run_flags):
        flags(p)
    return p


def _data_flags(p: argparse.ArgumentParser):
    g = p.add_argument_group("data")
    g.add_argument("--data", help="source for data.load: an embedded name (photos, fashion-mnist, trees, shapes), "
                                  "a local path or hf:NAME")
    g.add_argument("--streaming", action=argparse.BooleanOptionalAction, help="stream the source (hub scale)")
    g.add_argument("--epoch-size", type=POSITIVE, help="images per epoch of a streamed source (it has no length)")
    g.add_argument("--eval-split", help="split of the final evaluation (default: validation)")
    g.add_argument("--data-options", type=json.loads, help='JSON options for the source, e.g. \'{"crops_per_photo": 8}\'')
    g.add_argument("--num-workers", type=COUNT, help="data loader worker processes")
    g.add_argument("--pca-images", type=COUNT, help="finola: training crops the final evaluation's PCA baseline is "
                                                   "fitted on (k = C components; 0 skips it)")
    g.add_argument("--colour-jitter", type=AMOUNT, help="crop transforms: per-image brightness / contrast / "
                                                      "saturation jitter of this strength (ours; 0 in the paper)")
    g.add_argument("--augment", action=argparse.BooleanOptionalAction,
                   help="the task's training augmentation (--no-augment: evaluation's resize only, e.g. to overfit)")


def _model_flags(p: argparse.ArgumentParser):
    m = p.add_argument_group("model")
    m.add_argument("--encoder", choices=sorted(mobileformer.PRESETS) + sorted(mae.PRESETS),
                   help="Mobile-Former variant (Table 9), or a ViT (mae: MAE-Lite's vit-tiny, patches of --image-size "
                        "/ --grid)")
    m.add_argument("--channels", type=POSITIVE, help="latent channels C of q and the FINOLA map (Table 2a; masked-b: "
                                                "default the encoder's width, its features used directly)")
    m.add_argument("--paths", type=POSITIVE, help="finola: multi-path FINOLA, q holds M vectors of --channels grown by "
                   "the same A, B and summed (Chen et al., hidden waves; 1: the paper's); every baseline's k = M C")
    m.add_argument("--grid", type=POSITIVE, help="cells per image side: the FINOLA map's side (16 in the paper); "
                   "masked FINOLA's and a ViT's patches per side (each image size / grid pixels)")
    m.add_argument("--image-size", type=POSITIVE, help="training image side (detection: the evaluation shorter side, "
                   "800 in DETR; its training sizes scale with it)")
    m.add_argument("--upsampler", choices=autoencoder.UPSAMPLERS,
                   help="finola: Table 10's conv upsampler (the paper's) or its linear one, each cell's C channels to "
                        "its (image size / grid)^2 patch (ours for the small preset: faster on a CPU)")
    m.add_argument("--widths", type=POSITIVE, nargs="+", help="res-conv widths of the conv upsampler (Table 10)")
    m.add_argument("--zero-init-residual", action=argparse.BooleanOptionalAction,
                   help="a fresh encoder's residual branches start at zero (ours; on in the small finola preset, "
                        "off as in Mobile-Former's code otherwise)")
    m.add_argument("--down-shortcut", action=argparse.BooleanOptionalAction,
                   help="a fresh Mobile-Former's M-F↓ blocks add a linear 2x2/2 conv of their input (ours; off in "
                        "every preset, the ablation in EXPERIMENTS.md)")
    m.add_argument("--final-act", action=argparse.BooleanOptionalAction,
                   help="a fresh Mobile-Former's final 1x1 conv + BN ends in ReLU6 (the paper does not say; on in "
                        "every preset but the small finola one, where --no-final-act leaves the map linear: "
                        "EXPERIMENTS.md)")
    m.add_argument("--pool-positions", action=argparse.BooleanOptionalAction,
                   help="finola: a learned embedding of the encoder map's positions added to the pooler's keys "
                        "(ours; on in the small finola preset, off as in the paper otherwise: EXPERIMENTS.md)")
    m.add_argument("--spectral-loss", type=AMOUNT, metavar="ALPHA",
                   help="finola: weigh the error along the training crops' K leading principal directions by "
                        "(λ_K / λ_k)^ALPHA, so the low-variance ones learn sooner (autoencoder.SpectralMSE; ours; "
                        "0: the paper's plain MSE)")
    m.add_argument("--compile", action=argparse.BooleanOptionalAction,
                   help="wrap the model in torch.compile (off by default; costs and gains on a CPU: EXPERIMENTS.md, Speed)")
    m.add_argument("--q-position", choices=finola.Q_POSITIONS, help="where q sits in the map (App. E.1)")
    m.add_argument("--norm", choices=["layer", "moving-average"], help="FINOLA normalization (§4's ablation)")
    m.add_argument("--output", choices=autoencoder.OUTPUTS, help="finola: what the upsampler predicts, the image in [0, 1] "
                                                          "or normalized as the encoder sees it (autoencoder.OUTPUTS)")
    m.add_argument("--init", help="start the encoder from any of our .safetensors files (default: random init); "
                                  "finetune from a classifier file with the same --decoder also starts its decoder there")
    m.add_argument("--freeze-encoder", action=argparse.BooleanOptionalAction,
                   help="finola: keep the encoder fixed, train pooling + FINOLA + upsampler (App. D, with --init)")


def _decoder_flags(p: argparse.ArgumentParser):
    m = p.add_argument_group("decoders on an encoder")
    m.add_argument("--decoder", choices=[*sorted(detr.PRESETS), *classify.DECODERS],
                   help="the decoder on the encoder: DETR's Mobile-Former decoder (Tables 4, 18), or the classifier's "
                        "(lin: BN + linear; tran-1 / tran-4: 1 / 4 transformer blocks + linear; App. B)")
    m.add_argument("--num-queries", type=POSITIVE, help="DETR object queries (100 in the paper)")
    m.add_argument("--position-layout", choices=detr.POSITION_LAYOUTS,
                   help="DETR decoder: a whole sine encoding in each attention head's channels (heads), or DETR's "
                        "y-then-x channels, which give each Mobile-Former bridge head one axis (axes: files before "
                        "the fix)")
    m.add_argument("--reference-boxes", action=argparse.BooleanOptionalAction,
                   help="DETR decoder: each query keeps a box, refined block by block, that centres a Gaussian prior "
                        "on its attention and embeds into its queries (ours, after SMCA / DAB / Deformable DETR; "
                        "off in the paper's recipe)")
    m.add_argument("--denoising", type=COUNT,
                   help="DETR: groups of noised true boxes fed as extra training queries that learn to give them back "
                        "(DN-DETR; needs --reference-boxes; 0: none, the paper's)")
    m.add_argument("--class-loss", choices=detection.CLASS_LOSSES,
                   help="DETR: softmax cross-entropy with no-object (ce, the paper's) or Deformable DETR's sigmoid "
                        "focal loss (focal)")
    m.add_argument("--upsampler-width", type=POSITIVE, help="masked-b: width of the transformer upsampler (Table 10: "
                                                          "512)")
    m.add_argument("--upsampler-depth", type=POSITIVE, help="masked-b: its transformer blocks (Table 10: 6; Table 16)")
    m.add_argument("--decoder-width", type=POSITIVE, help="mae: width of MAE's decoder (MAE-Lite: 96)")
    m.add_argument("--decoder-depth", type=POSITIVE, help="mae: its transformer blocks (MAE-Lite: 1)")
    m.add_argument("--mask-ratio", type=AMOUNT, help="mae: the fraction of patches removed (MAE: 0.75)")
    m.add_argument("--head", choices=list(classify.DECODERS), help=argparse.SUPPRESS)  # the old --decoder of a
    # classifier; works for one release with a warning (see RENAMED_FLAGS)
    m.add_argument("--feature-norm", action=argparse.BooleanOptionalAction,
                   help="tran-N decoders: standardize the encoder map's channels first (BatchNorm without affine, as "
                        "the linear probe's; ours, off in the paper's recipe)")
    m.add_argument("--dropout", type=AMOUNT, help="tran-N decoders (Table 13: 0.1 for MF-W720, 0.2 for W1440/W2880)")


def _optimisation_flags(p: argparse.ArgumentParser):
    o = p.add_argument_group("optimisation")
    o.add_argument("--batch-size", type=POSITIVE, help="the global batch: images per optimizer step over all processes "
                                                       "and --grad-accum micro-steps (the paper's batch sizes)")
    o.add_argument("--epochs", type=POSITIVE)
    o.add_argument("--max-steps", type=POSITIVE, help="stop after this many optimizer steps (the schedule's length)")
    o.add_argument("--warmup-epochs", type=AMOUNT)
    o.add_argument("--lr", type=RATE, help="base learning rate (scaled by --batch-size / 256 with --scale-lr)")
    o.add_argument("--scale-lr", action=argparse.BooleanOptionalAction, help="lr = base x --batch-size / 256")
    o.add_argument("--schedule", choices=["cosine", "step"], help="cosine decay, or x0.1 at --lr-drop-epoch")
    o.add_argument("--lr-drop-epoch", type=AMOUNT, help="epoch of the x0.1 drop of the step schedule")
    o.add_argument("--weight-decay", type=AMOUNT)
    o.add_argument("--betas", type=float, nargs=2, help="AdamW betas (FINOLA presets: MAE's 0.9 0.95)")
    o.add_argument("--grad-accum", type=POSITIVE, help="gradient accumulation steps (the global batch is split over them)")
    o.add_argument("--clip-grad", type=AMOUNT, help="clip the gradient norm to this (DETR: 0.1, on in the detection "
                                                    "presets; 0: off)")
    o.add_argument("--seed", type=int)
    o.add_argument("--optimizer", choices=["adamw", "sgd", "muon"],
                   help="sgd: momentum 0.9 (linear probing, Table 13); muon: Muon on the weight matrices and kernels, "
                        "AdamW (--betas) on the vectors, the same lr and weight decay (muon.py; not the paper's)")
    o.add_argument("--label-smoothing", type=AMOUNT, help="of the classification loss (Table 13: 0.1 for tran-1)")
    o.add_argument("--random-erase", type=AMOUNT, help="RandomErasing probability with RandAug (0.25 for MF-W2880)")
    o.add_argument("--crop-ratio", type=RATE, help="classification: evaluation resizes to size / ratio and centre-"
                                                    "crops (0.875; 1 keeps small images whole)")


def _run_flags(p: argparse.ArgumentParser):
    r = p.add_argument_group("run")
    r.add_argument("--threads", type=POSITIVE, help="CPU threads per process (default: every core for a single CPU "
                                               "process, as accelerate leaves each process one)")
    r.add_argument("--out", help="run folder (default: runs/<task>-<YYYYmmdd-HHMMSS>)")
    r.add_argument("--resume", help="a run folder to continue from its last checkpoint, with its saved flags; only "
                                    + ", ".join("--" + k.replace("_", "-") for k in RESUMABLE) + " may change")
    r.add_argument("--checkpoint-every", type=POSITIVE, help="optimizer steps between checkpoints")
    r.add_argument("--log-every", type=POSITIVE, help="optimizer steps between metrics.jsonl lines")
    r.add_argument("--log-with", nargs="+", choices=sorted(TRACKERS),
                   help="also log the metrics (and the task's figure) to these trackers through Accelerate, under the "
                        "run folder; optional installs (pip install tensorboard, wandb, ...). metrics.jsonl is always "
                        "written")


def parse_args(argv=None) -> argparse.Namespace:
    """The run's flags: the command line, then the preset, then ``DEFAULTS``; with ``--resume``, the run's saved
    flags, of which only ``RESUMABLE`` may be changed (others given with a different value are refused)."""
    p = _parser()
    args = renamed_flags(p.parse_args(argv))
    given = {k for k, v in vars(args).items() if v is not None}
    if args.resume:
        return _resumed(p, args, given)
    if args.task is None:
        p.error("the following arguments are required: --task (or --resume RUN)")
    preset = TASKS[args.task].presets[args.preset or "small"]
    for key, default in DEFAULTS.items():
        if getattr(args, key, None) is None:
            setattr(args, key, preset.get(key, default))
    if args.data is None:
        p.error(f"--data is required for task {args.task!r}")
    if args.streaming and not args.epoch_size:
        p.error("--epoch-size is required with --streaming: a streamed dataset has no length, so the schedule "
                "counts epochs of --epoch-size images")
    return args


def renamed_flags(args: argparse.Namespace, *, warn: bool = True) -> argparse.Namespace:
    """Flags renamed for one meaning per name, read from their old spelling for one release (with a warning): a
    classifier's --head is --decoder; MAE's --upsampler-width / --upsampler-depth are --decoder-width / -depth.
    Also applied, silently, to the flags of runs saved before (args.json)."""
    flags, task = vars(args), vars(args).get("task")
    moves = [("head", "decoder")] if task in TASKS and TASKS[task].evaluation == "classify" else []
    moves += [("upsampler_width", "decoder_width"), ("upsampler_depth", "decoder_depth")] if task == "mae" else []
    for before, after in moves:
        unset = flags.get(after) is None or (after == "decoder" and flags[after] not in classify.DECODERS)
        if flags.get(before) is not None and unset:
            if warn:
                warnings.warn(f"--{before.replace('_', '-')} is now --{after.replace('_', '-')} for --task {task}; "
                              "the old name goes in the next release", FutureWarning)
            flags[after] = flags[before]
    flags.pop("head", None)
    return args


def _resumed(p: argparse.ArgumentParser, args: argparse.Namespace, given: set[str]) -> argparse.Namespace:
    run = Path(args.resume)
    if not run.is_dir():
        raise FileNotFoundError(f"--resume {str(run)!r}: no such run folder")
    try:
        saved = json.loads((run / "args.json").read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"--resume {str(run)!r}: no args.json, so not a run folder of train.py") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"--resume {str(run)!r}: args.json is corrupt ({e}); the run's flags cannot be "
                         f"recovered from it") from None
    if not isinstance(saved, dict) or saved.get("task") not in TASKS:
        raise ValueError(f"--resume {str(run)!r}: args.json does not describe a train.py run (no known 'task')")
    saved = vars(renamed_flags(argparse.Namespace(**saved), warn=False))
    refused = [f"--{k.replace('_', '-')} {getattr(args, k)} (the run's: {saved.get(k)})"
               for k in sorted(given - {"resume", *RESUMABLE}) if getattr(args, k) != saved.get(k)]
    if refused:
        p.error(f"--resume continues a run with its own flags; these cannot change: {', '.join(refused)}. Only "
                + ", ".join("--" + k.replace("_", "-") for k in RESUMABLE) + " may; start a new run (--out) instead")
    return argparse.Namespace(**{**DEFAULTS, **saved, **{k: getattr(args, k) for k in given & set(RESUMABLE)},
                                 "resume": args.resume})


def per_process_batch(batch_size: int, *, processes: int, grad_accum: int) -> int:
    """``--batch-size`` is the global batch (Tables 12-14, App. C): per-process batch x processes x ``grad_accum``."""
    share = processes * grad_accum
    if batch_size % share:
        raise ValueError(f"--batch-size {batch_size}: the global batch must divide by processes x --grad-accum = "
                         f"{processes} x {grad_accum} = {share}")
    return batch_size // share


def lr_at(step: int, *, base: float, warmup: int, total: int, drop: int | None = None) -> float:
    """Linear warm-up, then cosine decay to 0 (Table 12); with ``drop``, a constant lr x0.1 from that step (App. C)."""
    if step < warmup:
        return base * (step + 1) / warmup
    if drop is not None:
        return base * (0.1 if step >= drop else 1.0)
    return 0.5 * base * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


# ---------------------------------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------------------------------

def train(args) -> Path:
    """One run of --task: build, train on --data for --epochs (or --max-steps), evaluate, save (``finish``)."""
    out = run_folder(args)
    accelerator = start_accelerator(args, out)
    task = TASKS[args.task]
    state = runs.find_checkpoint(out) if args.resume else None  # before any work: a run killed too early has none
    set_seed(args.seed)
    model = task.build(args)
    if accelerator.device.type == "cpu":
        model = model.to(memory_format=torch.channels_last)
    steps = Steps(args, task, accelerator)
    total = steps.total
    warmup = min(total, round(args.warmup_epochs * steps.per_epoch))
    base_lr = args.lr * (args.batch_size / 256 if args.scale_lr else 1)
    drop = round(args.lr_drop_epoch * steps.per_epoch) if args.schedule == "step" else None
    trained = [p for p in model.parameters() if p.requires_grad]  # a frozen backbone stays out
    optimizer = make_optimizer(trained, args, lr=base_lr, fused=accelerator.device.type in ("cpu", "cuda"))
    model, optimizer = accelerator.prepare(torch.compile(model) if args.compile else model, optimizer)
    log = runs.MetricsLog(out / "metrics.jsonl", enabled=accelerator.is_main_process,
                     accelerator=accelerator if args.log_with else None, flags=vars(args))
    step = steps.start(*restore_or_start(accelerator, state, out, args, log), log=log)
    t0, images, last_good = time.perf_counter(), 0, step
    with progress_bar(accelerator, args.task, total=total, completed=step) as update:
        for batches, epoch_done in steps:  # one optimizer step: its micro-batches
            for g in optimizer.param_groups:
                g["lr"] = lr_at(step, base=base_lr, warmup=warmup, total=total, drop=drop)
            loss = accumulate(accelerator, model, task, batches, args, check=lambda loss: check_finite(
                accelerator, loss, step, out, last_good))
            if args.clip_grad:
                accelerator.clip_grad_norm_(model.parameters(), args.clip_grad)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            images += sum(len(b["images"]) for b in batches) * accelerator.num_processes
            stats = None
            if step % args.log_every == 0 or step == total:
                rate, lr = images / (time.perf_counter() - t0), optimizer.param_groups[0]["lr"]
                log.write(step=step, epoch=steps.epoch, loss=loss.item(), lr=lr, img_per_s=rate)
                stats = f"loss {loss.item():.4f}  lr {lr:.2e}  {rate:.0f} img/s"
            update(step, stats)
            if epoch_done:  # logged before the checkpoint that counts the epoch as done
                steps.end_epoch()
            if step % args.checkpoint_every == 0 or step == total:
                runs.save_checkpoint(accelerator, out, step, steps.epoch + epoch_done, seen=steps.seen_by_all())
                last_good = step
    model = accelerator.unwrap_model(model, keep_torch_compile=False)  # the weights file has the plain names
    finish(accelerator, model, task, args, out, log=log, step=step, bad=steps.loader.bad)
    return out


def run_folder(args) -> Path:
    """--resume, --out or a fresh ``runs/TASK-TIME``; a new run refuses a folder that holds one already."""
    out = Path(args.resume or args.out or f"runs/{args.task}-{time.strftime('%Y%m%d-%H%M%S')}")
    if not args.resume and any((out / name).exists() for name in ("state", "state.tmp", "state.old",
                                                                      "model.safetensors")):
        raise ValueError(f"--out {str(out)!r} already holds a run (a checkpoint or weights): continue it with "
                         f"--resume {str(out)!r}, or choose another --out")
    return out


def accumulate(accelerator, model, task, batches: list[dict], args, *, check) -> torch.Tensor:
    """The gradients of one optimizer step over its micro-batches (synced once, at the last), each image weighing
    the same also when the step is short; ``check(loss)`` on each. Returns the last micro-batch's loss."""
    model.train()
    n = sum(len(b["images"]) for b in batches)
    for i, batch in enumerate(batches):
        with contextlib.nullcontext() if i == len(batches) - 1 else accelerator.no_sync(model):
            loss = task.loss(model, batch, args)
            check(loss)
            accelerator.backward(loss if len(batches) == 1 else loss * (len(batch["images"]) / n))
    return loss


class Steps:
    """The training data as optimizer steps: each a list of --grad-accum micro-batches of this process (fewer at an
    epoch's end: no step mixes two epochs), epoch after epoch from where a resumed run stopped, its first batches
    skipped. A streamed epoch is its first --epoch-size images. The images of each epoch are counted over all
    processes, for its record in metrics.jsonl (``end_epoch``) and for the checkpoints (``seen_by_all``). It ends
    after ``total`` steps (--max-steps, else --epochs)."""

    def __init__(self, args, task, accelerator):
        self.args, self.accelerator = args, accelerator
        self.dataset = data.load(args.data, split="train", streaming=args.streaming, **args.data_options)
        local = per_process_batch(args.batch_size, processes=accelerator.num_processes, grad_accum=args.grad_accum)
        if accelerator.is_main_process:
            console.print(f"batch {args.batch_size} = {local} a process x {accelerator.num_processes} process(es) x "
                          f"{args.grad_accum} accumulation step(s)")
        transform = task.transform(args) if args.augment else tasks.unaugmented(task, args)
        # a batch of unreadable images is replaced, so that every process takes the same steps
        self.loader = data.Loader(self.dataset, batch_size=local, transform=transform, shuffle=True,
                                  num_workers=args.num_workers, seed=args.seed, accelerator=accelerator,
                                  replace_unreadable=True)
        self.per_epoch = (args.epoch_size // args.batch_size if args.streaming
                          else math.ceil(len(self.loader) / args.grad_accum))
        if self.per_epoch < 1:
            raise ValueError(f"--batch-size {args.batch_size}: the training data holds less than one step per epoch"
                             + (f" of --epoch-size {args.epoch_size}" if args.streaming else ""))
        self.batches = self.per_epoch * args.grad_accum if args.streaming else len(self.loader)  # an epoch's
        self.total = args.max_steps or args.epochs * self.per_epoch  # the run's optimizer steps

    def start(self, step: int, epoch: int, seen: int, *, log: runs.MetricsLog) -> int:
        """Continue at optimizer ``step`` of ``epoch``, whose first ``seen`` images (all processes) were used."""
        self.step, self.epoch, self.log = step, epoch, log
        # images this epoch, this process; a resumed run's count before the checkpoint is carried by the main one
        self.seen = torch.tensor(seen if self.accelerator.is_main_process else 0, device=self.accelerator.device)
        return step

    def seen_by_all(self) -> int:
        return self.accelerator.reduce(self.seen, "sum").item()

    def end_epoch(self):
        self.log.write(epoch=self.epoch, samples=self.seen_by_all(),
                       dataset=None if self.args.streaming else len(self.dataset))
        self.seen.zero_()

    def __iter__(self):
        accum = self.args.grad_accum
        while self.step < self.total:
            skip = (self.step - self.epoch * self.per_epoch) * accum  # > 0: resumed mid-epoch
            self.loader.set_epoch(self.epoch, skip=skip)
            read, group = skip, []
            for batch in itertools.islice(self.loader, self.batches - skip):
                read += 1
                self.seen += len(batch["images"])
                group.append(batch)
                if len(group) == accum or read == self.batches:
                    self.step += 1
                    yield group, read == self.batches
                    group = []
                    if self.step >= self.total:
                        return
            if read == skip:  # not one batch: every image unreadable, or an empty stream
                bad = self.loader.bad
                raise ValueError(f"--data {self.args.data!r}: epoch {self.epoch} gave no readable training images"
                                 + (f"; {bad.total()} unreadable files skipped, e.g. "
                                    f"{bad.skipped.most_common(1)[0][0]}" if bad.total() else ""))
            if read < self.batches:  # a stream that ran short
                warnings.warn(f"epoch {self.epoch}: the stream ended after {read} of its {self.batches} batches "
                              f"(--epoch-size {self.args.epoch_size} is more than it holds)")
                if group:
                    self.step += 1
                    yield group, False
                self.end_epoch()
            self.epoch += 1


def progress_bar(accelerator, description: str, *, total: int, completed: int):
    """A rich progress bar (main process only) as a context giving ``update(step, stats)``."""
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                        TextColumn("{task.fields[stats]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                        console=console, disable=not accelerator.is_main_process)
    bar = progress.add_task(description, total=total, completed=completed, stats="")

    @contextlib.contextmanager
    def running():
        with progress:
            yield lambda step, stats=None: progress.update(bar, completed=step,
                                                           **({"stats": stats} if stats else {}))
    return running()


def start_accelerator(args, out: Path) -> Accelerator:
    """Accelerate for this process, its trackers checked first; on a CPU with one process, torch gets every core
    (accelerate sets OMP_NUM_THREADS=1 per process) unless --threads says otherwise."""
    for name in args.log_with or []:
        module, package = TRACKERS[name]
        if importlib.util.find_spec(module) is None:
            raise ValueError(f"--log-with {name}: the {package!r} package is not installed: pip install {package}")
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), log_with=args.log_with or None, project_dir=str(out))
    if args.threads:
        torch.set_num_threads(args.threads)
    elif accelerator.device.type == "cpu" and accelerator.num_processes == 1:
        torch.set_num_threads(os.cpu_count() or 1)
    return accelerator


def make_optimizer(params: list, args, *, lr: float, fused: bool) -> torch.optim.Optimizer:
    """--optimizer over ``params`` in two groups: weight decay on matrices and kernels, none on vectors."""
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": args.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    if args.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9)
    if args.optimizer == "muon":
        return muon.Muon(groups, lr=lr, betas=tuple(args.betas), fused=fused)
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(args.betas), fused=fused)


def restore_or_start(accelerator, state: Path | None, out: Path, args, log: runs.MetricsLog) -> tuple[int, int, int]:
    """(step, epoch, images seen this epoch) to start from: a resumed run's checkpoint ``state`` loaded and its
    metrics rewound to it; a new run's folder made, its args.json written and any log of an earlier, never
    checkpointed attempt removed."""
    if state is not None:
        accelerator.load_state(str(state))
        saved = json.loads((state / "trainer.json").read_text())
        log.rewind(step=saved["step"], epoch=saved["epoch"])
        return saved["step"], saved["epoch"], saved.get("seen", 0)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        with weights.atomic_path(out / "args.json") as tmp:
            tmp.write_text(json.dumps(vars(args), indent=1))
        log.path.unlink(missing_ok=True)  # a run that died before its first checkpoint starts afresh
    return 0, 0, 0


def finish(accelerator, model, task, args, out: Path, *, log: runs.MetricsLog, step: int, bad: data.BadImages):
    """The end of a run: ranks checked in sync, then on the main process the task's evaluation, the weights with
    their metadata, the summary printed and the logged images; the trackers finished on every process."""
    log.write(step=step, ranks_in_sync=ranks_in_sync(accelerator, model))
    if accelerator.is_main_process:
        metrics = tasks.evaluate(task, model.eval(), args, out, bad=bad)
        log.write(step=step, final=metrics)
        weights.save_model(out / "model.safetensors", model, task=args.task, train=vars(args), data=args.data,
                           metrics=metrics)
        print_done(out, metrics, task.evaluation, bad)
        log.images(out, step=step)
    accelerator.wait_for_everyone()
    for tracker in accelerator.trackers:  # not accelerator.end_training(): main() tears the process group down
        tracker.finish()


def check_finite(accelerator, loss, step: int, out: Path, last_good: int):
    """Stop every process with a clear message on a NaN/inf loss; the last checkpoint stays as it was."""
    bad = accelerator.reduce((~torch.isfinite(loss.detach())).float().reshape(1), "sum")
    if bad.item() > 0:
        raise FloatingPointError(f"non-finite loss ({loss.item()}) at step {step + 1}; stopping. The last good "
                                 f"checkpoint is step {last_good} in {out / 'state'} (resume with --resume {out} "
                                 f"after lowering --lr)")


def ranks_in_sync(accelerator, model) -> bool:
    """True when every process holds bit-identical parameters (a fingerprint per tensor, gathered)."""
    fp = torch.stack([torch.stack([p.detach().double().sum(), p.detach().double().square().sum()])
                      for p in model.parameters()]).flatten()
    every = accelerator.gather(fp.to(accelerator.device)[None])
    return bool((every == every[:1]).all().item())


def print_done(out: Path, metrics: dict, eval_command: str, bad: data.BadImages):
    """Where the run left its weights, records and figures, its final figures, and how to evaluate it again."""
    console.print(f"[green]done[/green]: weights {out / 'model.safetensors'}, metrics {out / 'metrics.jsonl'}")
    for name in sorted(p.name for p in out.glob("*.png")):
        console.print(f"  figure {out / name}")
    console.print("  final: " + json.dumps(metrics))
    console.print(f"  evaluate again: python eval.py {eval_command} --weights {out / 'model.safetensors'}")
    if bad.total():
        console.print(bad.summary())


def main(argv=None):
    args = parse_args(argv)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    train(args)
    if distributed:  # gloo's teardown sometimes aborts after the work is done: leave cleanly
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    errors.run(main)
