"""Crash and resume under fire: a run killed at any moment and resumed ends bit-identical to one that was
never killed, logs each step once and never leaves a torn file; resume refuses flags that would change the run."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from PIL import Image

import errors
import runs
import train
from conftest import TINY_FINOLA, records

ROOT = Path(__file__).resolve().parents[1]
# 14 training rows in batches of 4: 4 steps an epoch, 8 in all, a checkpoint every 2 steps.
TINY = [*TINY_FINOLA, "--epochs", "2", "--checkpoint-every", "2"]
# (kill point, the checkpoint step the resume starts from). The worst moments: mid-step (after the backward pass)
# and each stage of save_checkpoint: state written but not yet marked complete, between the two renames (old
# `state` moved away, the new one still `state.tmp`), after them; mid-epoch, end-of-epoch and final checkpoints.
# The quick suite kills between the renames; `-m slow` runs the rest.
KILL_POINTS = [("checkpoint-old@4", 4)] + [
    pytest.param(kill, at, marks=pytest.mark.slow) for kill, at in
    [("step@3", 2), ("checkpoint-written@4", 2), ("checkpoint-old@2", 2), ("checkpoint-new@6", 6), ("step@8", 6),
     ("checkpoint-old@8", 8)]]


def script(env: dict) -> str:
    """train.py, or with FINOLA_CRASH_AT tests/crash.py: train.py with its power cut patched in."""
    return str(ROOT / ("tests/crash.py" if "FINOLA_CRASH_AT" in env else "train.py"))


def launch(argv, **env):
    """train.py in a fresh process (a kill takes the whole process, as a power cut does)."""
    return subprocess.run([sys.executable, script(env), *argv], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=600)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run."""
    out = tmp_path_factory.mktemp("reference") / "run"
    train.main(TINY + ["--out", str(out)])
    return out


def assert_same_run(run, reference):
    a, b = load_file(run / "model.safetensors"), load_file(reference / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs from the uninterrupted run's"
    steps = [r for r in records(run) if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 9)), "each step logged once"
    assert [r["loss"] for r in steps] == [r["loss"] for r in records(reference) if "loss" in r]
    epochs = [r for r in records(run) if "samples" in r]
    assert [(r["epoch"], r["samples"]) for r in epochs] == [(0, 14), (1, 14)], "each epoch logged once, in full"
    assert [r["final"] for r in records(run) if "final" in r] == [records(reference)[-1]["final"]]


@pytest.mark.parametrize("kill, resumed_at", KILL_POINTS)
def test_a_run_killed_at_each_stage_resumes_to_the_same_weights(tmp_path, reference, kill, resumed_at):
    out = tmp_path / "run"
    proc = launch(TINY + ["--out", str(out)], FINOLA_CRASH_AT=kill)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert not (out / "model.safetensors").exists()
    if kill.startswith("checkpoint-old"):  # killed between the renames: no `state`, the new one complete in state.tmp
        assert not (out / "state").exists() and (out / "state.tmp" / "trainer.json").exists()
    train.main(["--resume", str(out)])
    assert_same_run(out, reference)
    assert [r["resumed_at_step"] for r in records(out) if "resumed_at_step" in r] == [resumed_at]


@pytest.mark.slow
def test_a_kill_while_writing_the_weights_leaves_no_torn_file(tmp_path, reference):
    out = tmp_path / "run"
    # save_file writes half a file and the process dies before the rename
    code = ("import os, signal, sys, weights, train\n"
            "def torn(tensors, path, metadata=None):\n"
            "    open(path, 'wb').write(b'half a safetensors file')\n"
            "    os.kill(os.getpid(), signal.SIGKILL)\n"
            "weights.save_file = torn\n"
            "train.main(sys.argv[1:])\n")
    proc = subprocess.run([sys.executable, "-c", code, *TINY, "--out", str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert not (out / "model.safetensors").exists(), "a torn weights file never takes the real name"
    train.main(["--resume", str(out)])  # the last checkpoint is the final step: resume only evaluates and saves
    assert_same_run(out, reference)


@pytest.mark.slow
def test_random_time_kills_then_resume(tmp_path, reference):
    """Kill a run from outside (SIGKILL) at three random moments, resuming each time, then let it finish. A moment is
    a random delay after the run logs a random step it has not yet checkpointed, so the kills land in training and
    checkpoints however fast the machine is."""
    out, rng, kills, attempts = tmp_path / "run", random.Random(0), 0, 0
    argv = TINY + ["--out", str(out)]
    while not (out / "model.safetensors").exists():
        attempts += 1
        assert attempts < 20, "a run that never finishes"
        done = max((json.loads((out / n / "trainer.json").read_text())["step"] for n in ("state", "state.tmp",
                    "state.old") if (out / n / "trainer.json").exists()), default=0)
        target, delay = rng.randint(min(done + 1, 7), 7), rng.uniform(0.0, 0.3)  # in training, before its end
        proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *argv], cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while kills < 3 and proc.poll() is None and not any(r.get("step", 0) >= target and "loss" in r for r in (
                runs.read_metrics(out / "metrics.jsonl") if (out / "metrics.jsonl").exists() else [])):
            time.sleep(0.02)
        time.sleep(delay)
        if kills < 3 and proc.poll() is None:  # three kills, then the run may finish
            proc.send_signal(signal.SIGKILL)
            kills += 1
        assert proc.wait() in (0, -signal.SIGKILL)
        has_checkpoint = any((out / n / "trainer.json").exists() for n in ("state", "state.tmp", "state.old"))
        argv = ["--resume", str(out)] if has_checkpoint else TINY + ["--out", str(out)]
    assert kills == 3
    assert_same_run(out, reference)


# --- what resume accepts ------------------------------------------------------------------------------------------

def test_resume_accepts_steering_flags_and_refuses_the_rest(tmp_path, capsys):
    out = tmp_path / "run"
    (out / "state").mkdir(parents=True)
    (out / "args.json").write_text(json.dumps(vars(train.parse_args(TINY + ["--out", str(out)]))))
    args = train.parse_args(["--resume", str(out), "--max-steps", "5", "--log-every", "3", "--threads", "2",
                             "--num-workers", "1", "--checkpoint-every", "7", "--lr", "0.05", "--task", "finola"])
    assert (args.max_steps, args.log_every, args.threads, args.num_workers, args.checkpoint_every) == (5, 3, 2, 1, 7)
    assert args.lr == 0.05 and args.channels == 16 and args.resume == str(out), "the rest is the run's own"
    with pytest.raises(SystemExit) as e:
        train.parse_args(["--resume", str(out), "--lr", "0.1", "--channels", "32"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--channels 32 (the run's: 16), --lr 0.1 (the run's: 0.05)" in err and "--max-steps" in err


@pytest.mark.parametrize("content, message", [
    (None, "no args.json"), ("{not json", "args.json is corrupt"), ('{"lr": 1}', "does not describe a train.py run")])
def test_resume_of_a_broken_run_folder_says_what_is_wrong(tmp_path, content, message):
    out = tmp_path / "run"
    out.mkdir()
    if content is not None:
        (out / "args.json").write_text(content)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        train.parse_args(["--resume", str(out)])


def test_resume_of_a_run_killed_before_its_first_checkpoint_says_to_start_again(tmp_path, capsys):
    """What a run killed mid-step 1 leaves (args.json and a log line, no checkpoint; killed for real in the slow
    test below): resume says so in one line, exit status 2; a new run in the same folder starts afresh."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "args.json").write_text(json.dumps(vars(train.parse_args(TINY + ["--out", str(out)]))))
    (out / "metrics.jsonl").write_text('{"step": 1, "epoch": 0, "loss": 0.3}\n')
    with pytest.raises(SystemExit) as e:
        errors.run(train.main, ["--resume", str(out)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(lines) == 1 and "no checkpoint yet" in lines[0] and "Start it again" in lines[0]
    train.main(TINY + ["--out", str(out), "--max-steps", "1"])
    assert [r["step"] for r in records(out) if "loss" in r] == [1], "the dead run's log lines are gone"


@pytest.mark.slow
def test_a_process_killed_in_its_first_step_then_resumed_exits_2_with_one_line(tmp_path):
    out = tmp_path / "run"
    proc = launch(TINY + ["--out", str(out)], FINOLA_CRASH_AT="step@1")
    assert proc.returncode == -signal.SIGKILL
    proc = launch(["--resume", str(out)])
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "no checkpoint yet" in lines[0], proc.stderr


def test_a_new_run_never_overwrites_a_finished_one(tmp_path):
    out = tmp_path / "run"
    train.main(TINY + ["--out", str(out), "--max-steps", "1"])
    before = (out / "model.safetensors").read_bytes()
    with pytest.raises(ValueError, match="already holds a run.*--resume"):
        train.main(TINY + ["--out", str(out), "--max-steps", "1"])
    assert (out / "model.safetensors").read_bytes() == before


@pytest.mark.parametrize("flag, value, expected", [
    ("--channels", "-3", "expected a positive integer, got -3"), ("--lr", "0", "expected a number > 0, got 0"),
    ("--batch-size", "two", "expected a positive integer, got 'two'"), ("--widths", "0", "expected a positive integer, got 0"),
    ("--weight-decay", "-1", "expected a number >= 0")])
def test_nonsensical_flag_values_are_one_line_errors(flag, value, expected, capsys):
    with pytest.raises(SystemExit) as e:
        errors.run(train.main, ["--task", "finola", flag, value])
    assert e.value.code == 2
    assert f"argument {flag}: {expected}" in capsys.readouterr().err.strip().splitlines()[-1]


def test_streaming_needs_an_epoch_size(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--task", "finola", "--data", "photos", "--streaming"])
    assert "--epoch-size is required with --streaming" in capsys.readouterr().err


def test_metrics_reader_skips_a_torn_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.4}\n{"step": 3, "lo')
    with pytest.warns(UserWarning, match="line 3 is not JSON"):
        assert [r["step"] for r in runs.read_metrics(path)] == [1, 2]


# --- the paper's streaming path, on CPU ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A local folder of 24 small photos-like images (random colours and gradients)."""
    root = tmp_path_factory.mktemp("folder")
    g = torch.Generator().manual_seed(0)
    for n in range(24):
        ramp = torch.linspace(0, 1, 40)
        img = (torch.rand(3, 1, 1, generator=g) * ramp[None, :, None] + torch.rand(3, 1, 1, generator=g)
               * ramp[None, None, :]).clamp(0, 1)
        Image.fromarray((img.permute(1, 2, 0) * 255).byte().numpy()).save(root / f"{n:02d}.png")
    return root


@pytest.mark.slow
def test_a_streamed_run_killed_mid_epoch_resumes_on_the_same_samples(tmp_path, folder):
    """--streaming --epoch-size 12: 3 steps an epoch of batch 4, 2 epochs; killed mid-step 5 (epoch 1), resumed from
    the step-4 checkpoint, it reads past the batches it had used and ends bit-identical to the uninterrupted run."""
    argv = [*TINY[:TINY.index("--data")], "--data", str(folder), *TINY[TINY.index("--data") + 4:], "--streaming",
            "--epoch-size", "12", "--eval-split", "train"]
    full = tmp_path / "full"
    train.main(argv + ["--out", str(full)])
    rows = records(full)
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 7)), "2 epochs of 12 images in steps of 4"
    assert [(r["epoch"], r["samples"]) for r in rows if "samples" in r] == [(0, 12), (1, 12)]

    out = tmp_path / "killed"
    proc = launch(argv + ["--out", str(out)], FINOLA_CRASH_AT="step@5")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    train.main(["--resume", str(out)])
    a, b = load_file(out / "model.safetensors"), load_file(full / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a), "the resumed run saw the same samples"
    assert [r["loss"] for r in records(out) if "loss" in r] == [r["loss"] for r in rows if "loss" in r]
    assert [(r["epoch"], r["samples"]) for r in records(out) if "samples" in r] == [(0, 12), (1, 12)]


# --- the paper presets cannot rot ----------------------------------------------------------------------------------

@pytest.mark.parametrize("task", sorted(train.TASKS))
def test_every_paper_preset_parses_and_builds_on_the_meta_device(task, monkeypatch):
    """No data is read: the builds that count classes see ImageNet's 1000 or COCO's 91 category ids."""
    import data
    monkeypatch.setattr(data, "load", lambda *a, **k: None)
    monkeypatch.setattr(data, "categories", lambda ds: list(range(91 if task.startswith("detr") else 1000)))
    args = train.parse_args(["--task", task, "--preset", "paper"])
    assert args.data.startswith("hf:"), "the paper presets read the hub"
    with torch.device("meta"):
        model = train.TASKS[task].build(args)
    assert next(model.parameters()).is_meta
    assert sum(p.numel() for p in model.parameters()) > 1_000_000, "a paper-sized model"
    json.dumps(model.config_dict())  # the config goes into the weights file's metadata


# --- two processes -------------------------------------------------------------------------------------------------

def launch2(argv, **env):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", script(env), *argv]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", **env})


@pytest.mark.slow
def test_a_two_process_run_killed_and_resumed_matches_the_uninterrupted_one(tmp_path):
    """The global batch of 4 is 2 a rank: 14 rows make 4 steps an epoch, 8 in all. Both ranks die mid-step 7;
    resumed under 2 processes from the step-6 checkpoint, the run ends bit-identical to the uninterrupted one."""
    full, out = tmp_path / "full", tmp_path / "killed"
    argv = TINY
    proc = launch2(argv + ["--out", str(full)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = launch2(argv + ["--out", str(out)], FINOLA_CRASH_AT="step@7")
    assert proc.returncode != 0 and not (out / "model.safetensors").exists()
    proc = launch2(["--resume", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = load_file(out / "model.safetensors"), load_file(full / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = records(out)
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 9))
    assert [(r["epoch"], r["samples"]) for r in rows if "samples" in r] == [(0, 14), (1, 14)]
    assert [r["ranks_in_sync"] for r in rows if "ranks_in_sync" in r] == [True]


def _detr_loss_on_rank(rank: int, port: int, results):
    import torch.distributed as dist

    import detection
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.manual_seed(0)
    outputs = {"pred_logits": torch.randn(1, 5, 4), "pred_boxes": torch.rand(1, 5, 4) * 0.5 + 0.25,
               "aux_outputs": []}
    n = 1 if rank == 0 else 3  # rank 0 holds 1 box, rank 1 holds 3: DETR divides both by their mean, 2
    targets = [{"labels": torch.arange(n) % 3, "boxes": torch.rand(n, 4) * 0.5 + 0.25}]
    criterion = detection.SetCriterion(3)
    results[rank] = (criterion(outputs, targets)["loss"].item(), criterion(outputs, targets, num_boxes=2.0)["loss"]
                     .item(), criterion(outputs, targets, num_boxes=float(n))["loss"].item())
    dist.destroy_process_group()


@pytest.mark.slow
def test_the_detr_loss_normalizes_by_the_boxes_of_all_processes():
    import socket

    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_detr_loss_on_rank, args=(port, results), nprocs=2)
    for rank in (0, 1):
        distributed, by_mean, by_own = results[rank]
        assert distributed == pytest.approx(by_mean, rel=1e-6), "num_boxes is the mean over the 2 processes"
        assert distributed != pytest.approx(by_own, rel=1e-3), "not the process's own count"


def test_time_s_counts_on_across_a_resume(tmp_path):
    """A resumed run's time_s continues from the kept records (cumulative training time), not from zero."""
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [
        {"step": 1, "loss": 1.0, "time_s": 40.0}, {"step": 2, "loss": 0.9, "time_s": 80.0},
        {"step": 3, "loss": 0.8, "time_s": 120.0}]))  # step 3 came after the checkpoint at step 2: dropped
    log = runs.MetricsLog(path, enabled=True)
    log.rewind(step=2, epoch=0)
    log.write(step=3, loss=0.7)
    records = runs.read_metrics(path)
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    assert 80.0 <= records[-1]["time_s"] < 120.0
    assert records[-2]["resumed_at_step"] == 2 and records[-2]["time_s"] >= 80.0
