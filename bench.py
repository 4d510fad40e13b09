"""Performance figures (benchmarks, not tests): `python bench.py COMMAND`.

Each command prints a rich table of what it measured on this machine.
"""
from __future__ import annotations

import argparse
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
}

if __name__ == "__main__":
    main()
