"""--log-with: the metrics of metrics.jsonl (and the task's figure) reach Accelerate's trackers (issue 17, item 1);
tested offline with TensorBoard's event files (tensorboard is in requirements-dev.txt, an optional install otherwise)."""
import importlib.util
import json

import pytest

import train
from test_resume import TINY


def test_tensorboard_gets_the_same_figures_as_metrics_jsonl(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    train.main(TINY + ["--out", str(out), "--max-steps", "3", "--log-with", "tensorboard"])
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
        errors.run(train.main, TINY + ["--out", str(tmp_path / "run"), "--log-with", "wandb"])
    assert e.value.code == 2
    assert "--log-with wandb: the 'wandb' package is not installed: pip install wandb" in capsys.readouterr().err
