"""A run folder: its checkpoints (written atomically, the newest complete one found again), ``metrics.jsonl``
written as a run goes (``MetricsLog``: one JSON object per logged step, epoch and final evaluation), read back, and
the curves it draws.

    python eval.py curves RUN [RUN ...] [--labels A B ...] [--out FOLDER]  (FOLDER/curves.png)

Several runs are overlaid (an ablation): loss, learning rate and images/s against the optimizer step, and each final
evaluation metric as a point at the run's last step.
"""
from __future__ import annotations

import json
import math
import shutil
import time
import warnings
from pathlib import Path

import weights

TRAINING = ("loss", "lr", "img_per_s")  # the per-step figures of a training record


def read_metrics(path) -> list[dict]:
    """The records of a ``metrics.jsonl``; a line torn by a kill (or otherwise not JSON) is skipped with a warning."""
    records = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            warnings.warn(f"{path}: line {n} is not JSON (torn by a kill?); skipped")
    return records


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints: Accelerate's full state in a folder, written to a temporary name and renamed into place
# ---------------------------------------------------------------------------------------------------------------------

def save_checkpoint(accelerator, out: Path, step: int, epoch: int, seen: int = 0):
    """The full training state in ``out/state``. It is written to ``state.tmp``, then ``state`` becomes ``state.old``
    and ``state.tmp`` becomes ``state``: a kill at any moment leaves a complete ``state`` or ``state.old``."""
    tmp, final, old = out / "state.tmp", out / "state", out / "state.old"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        # trainer.json last: a folder without it is incomplete and never resumed from
        (tmp / "trainer.json").write_text(json.dumps({"step": step, "epoch": epoch, "seen": seen}))
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def find_checkpoint(run: Path) -> Path:
    """The newest complete checkpoint of a run: ``state``, or if a kill hit ``save_checkpoint``'s renames, a
    ``state.tmp`` holding its ``trainer.json`` (written last), else ``state.old``."""
    for name in ("state", "state.tmp", "state.old"):
        if (run / name / "trainer.json").exists():
            return run / name
    raise FileNotFoundError(
        f"--resume {str(run)!r}: the run has no checkpoint yet: it stopped before its first one (every "
        f"--checkpoint-every steps), so there is nothing to continue. Start it again with the command that began it "
        f"(its flags are in {str(run / 'args.json')!r})")


class MetricsLog:
    """metrics.jsonl: one JSON object per logged step, epoch or evaluation (main process only), appended line by
    line; after a kill, ``rewind`` drops what the checkpoint being resumed does not hold, so each step is logged
    once, and ``time_s`` (seconds of training) continues from the records it keeps."""

    def __init__(self, path: Path, *, enabled: bool, accelerator=None, flags: dict | None = None):
        self.path, self.enabled, self.t0, self.accelerator = path, enabled, time.time(), accelerator
        if accelerator is not None:  # --log-with: the trackers get the same figures, and the flags
            accelerator.init_trackers(path.parent.name, config={
                k: v for k, v in (flags or {}).items() if isinstance(v, (int, float, str, bool))})

    def write(self, **fields):
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps({**fields, "time_s": round(time.time() - self.t0, 2)}) + "\n")
        if self.accelerator is not None and "step" in fields:
            values = {f"final/{k}": v for k, v in fields.get("final", {}).items()} | {
                k: v for k, v in fields.items() if k not in ("step", "final")}
            self.accelerator.log({k: v for k, v in values.items() if isinstance(v, (int, float))
                                  and not isinstance(v, bool)}, step=fields["step"])

    def images(self, out: Path, *, step: int):
        """The run's PNGs to the trackers that take images."""
        import numpy as np
        from PIL import Image

        for tracker in self.accelerator.trackers if self.accelerator is not None else []:
            for png in sorted(out.glob("*.png")):
                if tracker.name == "tensorboard":
                    pixels = np.asarray(Image.open(png).convert("RGB"))[None]
                    tracker.log_images({png.stem: pixels}, step=step, dataformats="NHWC")
                elif hasattr(tracker, "log_images"):
                    tracker.log_images({png.stem: [Image.open(png).convert("RGB")]}, step=step)

    def rewind(self, *, step: int, epoch: int):
        """Keep the step records up to ``step`` and the records of epochs before ``epoch`` (atomically)."""
        if not self.enabled or not self.path.exists():
            return
        kept = [r for r in read_metrics(self.path)
                if ("loss" in r and r["step"] <= step) or ("samples" in r and r["epoch"] < epoch)
                or r.get("resumed_at_step", math.inf) <= step]
        with weights.atomic_path(self.path) as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self.t0 -= max((r.get("time_s", 0) for r in kept), default=0)  # time_s counts on from the kept records
        self.write(resumed_at_step=step)


def run_metrics(run) -> list[dict]:
    """``read_metrics`` of a run folder (or of a ``metrics.jsonl`` itself), with a clear error for anything else."""
    path = Path(run)
    path = path / "metrics.jsonl" if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"run: no metrics.jsonl at {str(path)!r} (a run folder of train.py holds one)")
    return read_metrics(path)


def curves(records: list[dict]) -> dict[str, tuple[list[int], list[float]]]:
    """``{name: (steps, values)}``: each of ``TRAINING`` over the logged steps, and ``final/<metric>`` (one point at
    the step of the final evaluation) for each numeric metric of it (image counts left out)."""
    out: dict[str, tuple[list[int], list[float]]] = {}
    for r in records:
        if "loss" in r:
            for name in TRAINING:
                if isinstance(r.get(name), (int, float)):
                    out.setdefault(name, ([], []))[0].append(r["step"])
                    out[name][1].append(float(r[name]))
        for name, value in (r.get("final") or {}).items():
            if name.endswith("images"):  # counts of evaluated images, not metrics
                continue
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                out[f"final/{name}"] = ([r["step"]], [float(value)])
    return out


def last_values(series: dict[str, tuple[list[int], list[float]]]) -> dict[str, float]:
    """Each curve's last value, and the last step."""
    out = {name: values[-1] for name, (_, values) in series.items()}
    steps = [s for steps, _ in series.values() for s in steps]
    return {"step": max(steps, default=0), **out}


def draw(runs: dict[str, dict], path) -> Path:
    """One panel per curve name over all ``runs`` (``{label: curves(...)}``), the runs overlaid; a PNG at ``path``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from analysis import save_figure

    names = sorted({n for s in runs.values() for n in s}, key=lambda n: (n not in TRAINING, TRAINING.index(n)
                                                                          if n in TRAINING else 0, n))
    if not names:
        raise ValueError("runs: no logged steps or evaluations to draw")
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        for label, series in runs.items():
            if name in series:
                steps, values = series[name]
                ax.plot(steps, values, marker="o" if len(steps) == 1 else None, label=label)
        ax.set_title(name)
        ax.set_xlabel("step")
        if name == "loss" and all(v > 0 for s in runs.values() for v in s.get("loss", ([], []))[1]):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    path = save_figure(fig, path)
    plt.close(fig)
    return path


def compare(paths: list, *, labels: list[str] | None = None, out=None, console=None) -> dict:
    """``eval.py curves``: the runs' curves drawn to ``out`` (default: ``curves.png`` in the first run's folder), their
    last values as a rich table; returns ``{"runs": {label: last values}, "figure": path}``."""
    from rich.markup import escape
    from rich.table import Table

    labels = labels or [Path(p).name for p in paths]
    if len(labels) != len(paths):
        raise ValueError(f"--labels: {len(labels)} names for {len(paths)} runs")
    series = {label: curves(run_metrics(p)) for label, p in zip(labels, paths)}
    figure = draw(series, out or Path(paths[0]) / "curves.png")
    finals = {label: last_values(s) for label, s in series.items()}
    names = sorted({n for f in finals.values() for n in f})
    table = Table(title=escape(f"Last values of {len(finals)} run(s); curves in {figure}"))
    for col in ("run", *names):
        table.add_column(col, justify="right")
    for label, f in finals.items():
        table.add_row(escape(label), *(f"{f[n]:.4g}" if n in f else "" for n in names))
    if console is not None:
        console.print(table)
    return {"runs": finals, "figure": str(figure)}
