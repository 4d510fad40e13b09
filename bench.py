"""Performance figures (benchmarks, not tests): `python bench.py COMMAND`.

Each command prints a rich table of what it measured on this machine (``pipeline`` then one JSON line).
"""
from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time

import torch
from rich.console import Console
from rich.table import Table

console = Console(width=None if sys.stdout.isatty() else 140)


def timeit(fn, *, repeat: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in milliseconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


# --- finola: the parallel expansion against the sequential one and the matmul floor ---------------------------------

def bench_finola(args):
    """ms per ``finola.expand`` (16x16, q at the centre) vs ``expand_sequential`` and vs one matmul of equal FLOPs."""
    import finola

    H = W = 16
    table = Table(title=f"finola.expand, {H}x{W}, float32, {torch.get_num_threads()} threads")
    for col in ("C", "batch", "expand ms", "fwd+bwd ms", "sequential ms", "floor ms", "expand/floor", "speed-up"):
        table.add_column(col, justify="right")
    for C in args.channels:
        p = finola.init(C, generator=torch.Generator().manual_seed(0))
        for B in args.batch:
            q = torch.randn(B, C)
            rows = B * ((W - 1) + (H - 1) * W + (H - 1) + (W - 1) * H)  # the steps' total rows, both paths
            x, w = torch.randn(rows, C), torch.randn(C, C)
            with torch.no_grad():
                t_exp = timeit(lambda: finola.expand(p, q), repeat=args.repeat)
                t_floor = timeit(lambda: x @ w.T, repeat=args.repeat)
                seq = C <= args.max_sequential_channels
                t_seq = timeit(lambda: finola.expand_sequential(p, q), repeat=1, warmup=0) if seq else None
            leaves = {k: v.clone().requires_grad_() for k, v in p.items()}
            qg = q.clone().requires_grad_()
            t_bwd = timeit(lambda: finola.expand(leaves, qg).sum().backward(), repeat=args.repeat)
            table.add_row(str(C), str(B), f"{t_exp:.1f}", f"{t_bwd:.1f}", f"{t_seq:.0f}" if seq else "skipped",
                          f"{t_floor:.1f}", f"{t_exp / t_floor:.2f}x", f"{t_seq / t_exp:.0f}x" if seq else "-")
    console.print(table)


def _finola_args(p):
    p.add_argument("--channels", type=int, nargs="+", default=[128, 512, 3072])
    p.add_argument("--batch", type=int, nargs="+", default=[8, 32, 64])
    p.add_argument("--repeat", type=int, default=5, help="timed repetitions (median reported)")
    p.add_argument("--max-sequential-channels", type=int, default=512,
                   help="time expand_sequential only up to this C (it takes minutes at C=3072)")


# --- detr: MF-Dec head sizes against the paper ---------------------------------------------------------------------

# (decoder, backbone) -> (head params M, head MAdds G at 800x1333), FINOLA Tables 4 / 18.
DETR_PAPER = {("mf-dec-522", "mf-w2880"): (19.4, 34.6), ("mf-dec-522", "mf-w1440"): (18.6, 32.3),
              ("mf-dec-522", "mf-w720"): (18.2, 31.1), ("mf-dec-211", "mf-w2880"): (9.2, 15.7),
              ("mf-dec-211", "mf-w1440"): (8.4, 13.4), ("mf-dec-211", "mf-w720"): (8.0, 12.2)}


def bench_detr_params(args):
    """DETR head (decoder + class/box heads, 91 classes) params and MAdds vs Tables 4/18, counted on the meta device.
    MAdds = FLOPs/2 of convs, linears and attention (FlopCounterMode); BN, softmax, element-wise ops not counted."""
    import detr
    from torch.utils.flop_counter import FlopCounterMode

    H, W = args.size
    table = Table(title=f"DETR heads: params and MAdds at {H}x{W} vs FINOLA Tables 4/18")
    for col in ("head", "backbone", "params M", "paper M", "ratio", "MAdds G", "paper G", "ratio"):
        table.add_column(col, justify="right")
    for (decoder, backbone), (paper_params, paper_madds) in DETR_PAPER.items():
        with torch.device("meta"):
            model = detr.create(backbone, decoder=decoder, num_classes=91).eval()
            maps = model.backbone.forward_features(torch.empty(1, 3, H, W))
        params = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("backbone.")) / 1e6
        with FlopCounterMode(display=False) as counter:
            states, _ = model.decoder(maps["features"], maps["stride8"])
            model.class_head(states), model.box_head(states)
        madds = counter.get_total_flops() / 2e9
        table.add_row(decoder, backbone, f"{params:.2f}", f"{paper_params}", f"{params / paper_params:.3f}",
                      f"{madds:.1f}", f"{paper_madds}", f"{madds / paper_madds:.2f}")
    console.print(table)


def _detr_params_args(p):
    p.add_argument("--size", type=int, nargs=2, default=[800, 1333], metavar=("H", "W"))


# --- mobileformer: encoder sizes against the paper, and training speed -------------------------------------------

# variant -> (params M, MAdds G at 800x1333): FINOLA Table 4 (W720/W1440/W2880), Table 2b (W4320/W5760, params only).
MF_PAPER = {"mf-w720": (4.9, 5.6), "mf-w1440": (11.7, 20.4), "mf-w2880": (25.0, 77.5), "mf-w4320": (43.5, None),
            "mf-w5760": (67.6, None), "mf-small": (None, None), "mf-tiny": (None, None),
            "mf-nano": (None, None)}


def _mf_cost(name: str, hw) -> tuple[float, float]:
    """(params M, MAdds G at hw) of a backbone without classifier, counted on the meta device (no arithmetic)."""
    import mobileformer
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = mobileformer.create(name).eval().requires_grad_(False)
        x = torch.empty(1, 3, *hw)
    with FlopCounterMode(display=False) as counter:
        model(x)
    return sum(p.numel() for p in model.parameters()) / 1e6, counter.get_total_flops() / 2e9


def bench_mf_params(args):
    """Backbone params and MAdds of the Mobile-Former variants vs the paper. MAdds = FLOPs/2 of convs, linears and
    attention matmuls (FlopCounterMode); BN, softmax and element-wise ops are not counted."""
    (H, W), (h, w) = args.size, args.small_size
    table = Table(title=f"Mobile-Former backbones (no classifier) vs FINOLA Tables 4 / 2b; MAdds at {H}x{W}")
    for col in ("variant", "params M", "paper M", "ratio", f"MAdds G {H}x{W}", "paper G", "ratio", f"MAdds G {h}x{w}"):
        table.add_column(col, justify="right")
    for name, (paper_params, paper_madds) in MF_PAPER.items():
        params, madds = _mf_cost(name, (H, W))
        small = _mf_cost(name, (h, w))[1]
        ratio = lambda ours, paper: f"{ours / paper:.3f}" if paper else "-"  # noqa: E731
        table.add_row(name, f"{params:.2f}", f"{paper_params or '-'}", ratio(params, paper_params),
                      f"{madds:.2f}", f"{paper_madds or '-'}", ratio(madds, paper_madds), f"{small:.3f}")
    console.print(table)


def _mf_params_args(p):
    p.add_argument("--size", type=int, nargs=2, default=[800, 1333], metavar=("H", "W"))
    p.add_argument("--small-size", type=int, nargs=2, default=[256, 256], metavar=("H", "W"))


def bench_mf_train_speed(args):
    """Training images/s (forward, backward, SGD step; eager) of Mobile-Former variants, NCHW vs channels_last."""
    import os

    import mobileformer

    if args.threads:
        torch.set_num_threads(args.threads)
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    table = Table(title=f"Mobile-Former training speed, batch {args.batch}, {torch.get_num_threads()} threads "
                        f"(load average before: {load})")
    for col in ("variant", "size", "layout", "ms/step", "img/s"):
        table.add_column(col, justify="right")
    for name in args.models:
        for size in args.sizes:
            for layout in (torch.contiguous_format, torch.channels_last):
                torch.manual_seed(0)
                model = mobileformer.create(name).train().to(memory_format=layout)
                opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
                x = torch.randn(args.batch, 3, size, size).contiguous(memory_format=layout)

                def step():
                    features, tokens = model(x)
                    opt.zero_grad(set_to_none=True)
                    (features.square().mean() + tokens.square().mean()).backward()
                    opt.step()

                ms = timeit(step, repeat=args.repeat, warmup=2)
                table.add_row(name, f"{size}²", "channels_last" if layout == torch.channels_last else "NCHW",
                              f"{ms:.0f}", f"{1e3 * args.batch / ms:.0f}")
    console.print(table)


def _mf_train_speed_args(p):
    p.add_argument("--models", nargs="+", default=["mf-tiny", "mf-small", "mf-w720"])
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeat", type=int, default=5, help="timed steps (median reported)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")



# --- pipeline: the data loader against the model's training step, per small preset --------------------------------

PIPELINE_TASKS = ("finola", "masked-e", "masked-b", "linprobe", "tran1-probe", "supervised", "detr-probe")


def _preset_args(name: str, preset: str = "small"):
    """The flags train.py would run ``--task name --preset preset`` with (the preset over train.DEFAULTS)."""
    import train
    from tasks import TASKS

    return argparse.Namespace(**{**train.DEFAULTS, **TASKS[name].presets[preset], "task": name, "preset": preset})


def _loader_rate(ds, transform, args, *, batches: int, warmup: int) -> tuple[float, int]:
    """(images/s, images decoded while timed) of ``data.loader`` alone: main process (train.py's default
    ``--num-workers 0``), shuffled, epoch after epoch, timed after ``warmup`` batches."""
    import data

    loader = data.Loader(ds, batch_size=args.batch_size, transform=transform, shuffle=True, seed=args.seed,
                         num_workers=args.num_workers)

    def forever():
        for epoch in itertools.count():
            loader.set_epoch(epoch)
            yield from loader

    stream = forever()
    for _ in range(warmup):
        next(stream)
    decoded, t0 = loader.cache.decodes, time.perf_counter()
    images = sum(len(next(stream)["images"]) for _ in range(batches))
    return images / (time.perf_counter() - t0), loader.cache.decodes - decoded


def _step_rate(task, args, batch, *, steps: int) -> float:
    """Images/s of the model's training step alone on one fixed batch: forward, loss, backward and optimizer step
    as in train.py (channels_last on a CPU, the preset's --optimizer from ``train.make_optimizer``)."""
    import train

    torch.manual_seed(args.seed)
    model = task.build(args)
    model = model.to(memory_format=torch.channels_last).train()
    optimizer = train.make_optimizer([p for p in model.parameters() if p.requires_grad], args, lr=1e-4, fused=True)

    def step():
        loss = task.loss(model, batch, args)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    ms = timeit(step, repeat=steps, warmup=2)
    return 1e3 * len(batch["images"]) / ms


def bench_pipeline(args):
    """Per small preset: the loader's images/s (its data, batch size and training transform, as train.py builds
    them) next to the model's training-step images/s, and the loader's share of a step that waits for it:
    t_loader / (t_loader + t_model) per image. "decoded": images decoded while timed (the rest came from the
    loader's cache). Rows marked "+augment" use the task's augmented transform where the preset trains without
    (--no-augment presets): what --augment or the paper preset would load."""
    import json
    import os

    import data
    import tasks
    from tasks import TASKS

    if args.threads:
        torch.set_num_threads(args.threads)
    else:
        torch.set_num_threads(os.cpu_count() or 1)  # train.py: every core for a single CPU process
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    table = Table(title=f"Loader vs training step, small presets, {torch.get_num_threads()} threads for the model, "
                        f"1 for the loader (load average before: {load})")
    for col in ("task", "data", "batch", "size", "transform", "loader img/s", "decoded", "step img/s",
                "loader share"):
        table.add_column(col, justify="right")
    rows = []
    for name in args.tasks:
        task, a = TASKS[name], _preset_args(name)
        ds = data.load(a.data, split="train", streaming=a.streaming, **a.data_options)
        # as train.py: the --no-augment presets read their images through the evaluation's transform
        transforms = [(task.transform.__name__, task.transform(a)) if a.augment else
                      (f"{task.evaluation}'s evaluation", tasks.unaugmented(task, a))]
        if not a.augment and args.augmented:
            transforms.append((task.transform.__name__ + " +augment", task.transform(a)))
        step = None
        for label, transform in transforms:
            rate, decoded = _loader_rate(ds, transform, a, batches=args.batches, warmup=args.warmup)
            if step is None:
                batch = next(iter(data.Loader(ds, batch_size=a.batch_size, transform=transform, shuffle=True)))
                step = _step_rate(task, a, batch, steps=args.steps)
            share = (1 / rate) / (1 / rate + 1 / step)
            rows.append({"task": name, "data": a.data, "batch": a.batch_size, "size": a.image_size,
                         "transform": label, "loader_img_s": round(rate, 1), "decoded_while_timed": decoded,
                         "step_img_s": round(step, 1), "loader_share": round(share, 4)})
            table.add_row(name, a.data, str(a.batch_size), f"{a.image_size}²", label, f"{rate:.0f}",
                          f"{decoded}/{args.batches * a.batch_size}", f"{step:.1f}", f"{100 * share:.1f}%")
    console.print(table)
    print(json.dumps({"bench": "pipeline", "threads": torch.get_num_threads(), "load_average": os.getloadavg(),
                      "rows": rows}))


def _pipeline_args(p):
    p.add_argument("--tasks", nargs="+", default=list(PIPELINE_TASKS), help="tasks whose small preset to measure")
    p.add_argument("--batches", type=int, default=100, help="timed loader batches")
    p.add_argument("--warmup", type=int, default=100, help="loader batches before timing (a small set's images are "
                   "then decoded and cached, as for most of a run)")
    p.add_argument("--steps", type=int, default=10, help="timed training steps (median reported)")
    p.add_argument("--augmented", action=argparse.BooleanOptionalAction, default=True,
                   help="also time the augmented transform of presets that train without augmentation")
    p.add_argument("--threads", type=int, default=0, help="torch threads of the model (0: every core, as train.py)")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (fn, help_, add_args) in COMMANDS.items():
        p = sub.add_parser(name, help=help_)
        add_args(p)
        p.set_defaults(fn=fn)
    args = parser.parse_args(argv)
    args.fn(args)


# name -> (function(args), one-line help, function(parser) adding its flags). Each issue registers its own.
COMMANDS: dict = {
    "finola": (bench_finola, "finola.expand vs expand_sequential vs the matmul floor", _finola_args),
    "detr-params": (bench_detr_params, "MF-Dec-522/211 head params and MAdds vs FINOLA Tables 4/18",
                    _detr_params_args),
    "params": (bench_mf_params, "Mobile-Former backbone params and MAdds vs FINOLA Tables 4 / 2b", _mf_params_args),
    "train-speed": (bench_mf_train_speed, "Mobile-Former training images/s, NCHW vs channels_last",
                    _mf_train_speed_args),
    "pipeline": (bench_pipeline, "the loader's images/s next to the training step's, per small preset",
                 _pipeline_args),
}

if __name__ == "__main__":
    import errors

    errors.run(main)
