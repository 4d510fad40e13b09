"""--log-with: the metrics of metrics.jsonl (and the task's figure) reach Accelerate's trackers, and `eval.py curves`
draws them; tested offline with TensorBoard's event files (tensorboard is in requirements-dev.txt, for users an
optional install)."""
import importlib.util
import json

import pytest

import train
from conftest import TINY_FINOLA


def test_tensorboard_gets_the_same_figures_as_metrics_jsonl(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    train.main(TINY_FINOLA + ["--out", str(out), "--max-steps", "3", "--log-with", "tensorboard"])
    events = list((out / "run").glob("events.out.tfevents.*"))
    assert events, f"an event file under {out / 'run'}"
    acc = EventAccumulator(str(out / "run"), size_guidance={"images": 0, "scalars": 0}).Reload()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    logged = acc.Scalars("loss")
    assert [e.step for e in logged] == [r["step"] for r in steps]
    assert [e.value for e in logged] == pytest.approx([r["loss"] for r in steps], rel=1e-6)
    assert [e.value for e in acc.Scalars("lr")] == pytest.approx([r["lr"] for r in steps], rel=1e-6)
    final = rows[-1]["final"]
    assert acc.Scalars("final/psnr_db")[0].value == pytest.approx(final["psnr_db"], rel=1e-6)
    assert "reconstructions" in acc.Tags()["images"]


def test_a_tracker_that_is_not_installed_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    import errors
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(SystemExit) as e:
        errors.run(train.main, TINY_FINOLA + ["--out", str(tmp_path / "run"), "--log-with", "wandb"])
    assert e.value.code == 2
    assert "--log-with wandb: the 'wandb' package is not installed: pip install wandb" in capsys.readouterr().err


def test_curves_command_overlays_runs_and_ends_with_the_final_values(tmp_path, capsys):
    import eval as ev
    import runs
    a, b = tmp_path / "a", tmp_path / "b"
    train.main(TINY_FINOLA + ["--out", str(a), "--max-steps", "3"])
    train.main(TINY_FINOLA + ["--out", str(b), "--max-steps", "2", "--lr", "0.01"])
    capsys.readouterr()
    result = ev.main(["curves", str(a), str(b / "metrics.jsonl"), "--labels", "lr 0.05", "lr 0.01",
                      "--out", str(tmp_path)])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == result
    for label, run, steps in (("lr 0.05", a, 3), ("lr 0.01", b, 2)):
        rows = runs.read_metrics(run / "metrics.jsonl")
        last = result["runs"][label]
        assert last["step"] == steps and last["loss"] == [r["loss"] for r in rows if "loss" in r][-1]
        assert last["final/psnr_db"] == rows[-1]["final"]["psnr_db"] and last["lr"] > 0
    from PIL import Image
    assert Image.open(tmp_path / "curves.png").size[0] > 600, "one panel per curve, three a row"
    with pytest.raises(ValueError, match="--labels: 1 names for 2 runs"):
        ev.main(["curves", str(a), str(b), "--labels", "x"])
    with pytest.raises(FileNotFoundError, match="no metrics.jsonl"):
        ev.main(["curves", str(tmp_path / "nowhere")])
