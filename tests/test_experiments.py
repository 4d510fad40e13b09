"""experiments.py, run as its command line: the tables and verdicts it prints from recorded results, recorded steps
that are never run again, and its errors (the studies themselves run for minutes to hours: benchmarks, not tests)."""
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

import autoencoder
import mobileformer
import weights

ROOT = Path(__file__).resolve().parents[1]


def experiments(*argv, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "experiments.py", *map(str, argv)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert not check or done.returncode == 0, done.stderr[-2000:]
    return done


def record(folder: Path, steps: dict):
    """``steps`` (step -> its record) appended to the study's results.jsonl, as experiments.Study writes them."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "results.jsonl", "a") as f:
        for step, fields in steps.items():
            f.write(json.dumps({"step": step, **fields}) + "\n")


def _row(top1):
    return {"final": {"top1": top1}}


@pytest.mark.slow  # ~6 s: experiments.py run as a command, torch imported anew each time
def test_the_table_reports_mean_and_std_over_seeds_and_marks_each_direction(tmp_path):
    done = {f"linprobe/{enc}/seed{s}": _row(v) for enc, values in
            {"finola": [0.70, 0.72, 0.74], "masked-b": [0.75, 0.77, 0.79], "masked-e": [0.60, 0.60, 0.60]}.items()
            for s, v in enumerate(values)}
    done["pretrain/finola"] = {"img_per_s": 250.0, "train_s": 1500.0, "steps": 11718, "final": {"psnr_db": 18.3}}
    done["curvature"] = {"checkpoints": {"finola": {"score_topk_median": 1.26}}}
    record(tmp_path, done)
    text = experiments("table1", "--print", "--out", tmp_path).stdout
    finola = next(line for line in text.splitlines() if line.startswith("| finola |"))
    assert "| 250 | 25.0 | 6.25 | 18.30 dB |" in finola and "72.0 ± 2.0 % (3)" in finola and "| 1.26 |" in finola
    assert "masked FINOLA-B probes above vanilla FINOLA (linprobe): **reproduced** (77.0 ± 2.0 % (3) vs 72.0" in text
    assert "masked FINOLA-E probes above vanilla FINOLA (linprobe): **not reproduced**" in text
    assert "(tran1-probe): not measured yet" in text and "| mae | – | – | – | – |" in text
    assert "Fig. 5: masked FINOLA's top-16 curvature above vanilla FINOLA's (masked-e): not measured yet" in text
    record(tmp_path, {"curvature": {"checkpoints": {"finola": {"score_topk_median": 1.26},
                                                    "masked-b": {"score_topk_median": 0.9}}},
                      "appd/finola": {"final": {"psnr_db": 20.0}}, "appd/masked-b": {"final": {"psnr_db": 18.5}}})
    text = experiments("table1", "--print", "--out", tmp_path).stdout  # a step recorded again: its last record
    assert ("Fig. 5: masked FINOLA's top-16 curvature above vanilla FINOLA's (masked-b): **not reproduced** "
            "(0.90 vs 1.26)") in text
    assert "Table 1: masking lowers App. D PSNR (masked-b): **reproduced** (18.50 dB vs 20.00 dB)" in text


@pytest.mark.slow  # ~6 s: experiments.py run as a command, torch imported anew each time
def test_the_detection_table_reports_ap_over_seeds_and_each_claim(tmp_path):
    done = {f"shapes/{enc}/seed{s}": {"final": {"AP": ap, "AP50": 2 * ap}, "steps": 2500, "train_s": 420.0}
            for enc, values in {"random-mf-tiny": [0.10, 0.12, 0.14], "finola-t1": [0.20, 0.20, 0.20],
                                "supervised-t1": [0.30, 0.31, 0.32]}.items()
            for s, ap in enumerate(values)}
    box = {"random-mf-tiny": [0.70, 0.80], "finola-t1": [0.60, 0.60]}
    done |= {f"box/shapes/{enc}/seed{s}": {"final": {"val_acc": acc}}
             for enc, values in box.items() for s, acc in enumerate(values)}
    record(tmp_path, done)
    text = experiments("table4", "--print", "--out", tmp_path).stdout
    assert "| shapes | random mf-tiny | 12.0 ± 2.0 (3) | 24.0 ± 4.0 (3) | 2500 | 7.0 | 75.0 ± 7.1 % (2) |" in text
    assert "| shapes | supervised (table1's) | 31.0 ± 1.0 (3) |" in text and "| – |" in text  # no box probe yet
    assert ("shapes: FINOLA (table1's) above a random encoder of its preset (DETR probe AP): **reproduced** "
            "(20.0 ± 0.0 (3)") in text
    assert ("shapes: FINOLA above supervised pre-training of the same encoder (Table 4) (DETR probe AP): **not "
            "reproduced** (20.0 ± 0.0 (3) vs 31.0 ± 1.0 (3))") in text
    assert ("shapes: FINOLA (table1's) above a random encoder of its preset (box probe accuracy): **not reproduced** "
            "(60.0 ± 0.0 % (2) vs 75.0 ± 7.1 % (2))") in text
    assert "README" not in text and "trees" not in text, "no row and no verdict for encoders or data not run"
    record(tmp_path, {f"trees/{enc}/seed{s}": {"final": {"AP": ap, "AP50": 2 * ap}, "steps": 1500, "train_s": 300.0}
                      for enc, values in {"random-mf-nano": [0.010, 0.030], "finola-readme": [0.020, 0.030]}.items()
                      for s, ap in enumerate(values)})
    assert ("trees: FINOLA (README's run) above a random encoder of its preset (DETR probe AP): **within seed "
            "noise** (2.5 ± 0.7 (2) vs 2.0 ± 1.4 (2))") in experiments("table4", "--print", "--out", tmp_path).stdout


@pytest.fixture
def table4_files(tmp_path):
    """table1's FINOLA and supervised files (mf-tiny encoders) and a README run's (mf-nano)."""
    config = autoencoder.FinolaConfig(channels=16, grid=(2, 2), upsampler="linear", patch=16)
    save = lambda path, name: weights.save_model(  # noqa: E731
        path, autoencoder.Finola(mobileformer.create(name), config), task="finola", data="photos")
    for name in ("finola", "supervised"):
        (tmp_path / "t1" / "pretrain" / name).mkdir(parents=True)
        save(tmp_path / "t1" / "pretrain" / name / "model.safetensors", "mf-tiny")
    return tmp_path / "t1", save(tmp_path / "readme.safetensors", "mf-nano"), config


@pytest.mark.slow
def test_table4_runs_nothing_already_recorded_and_compares_each_file_with_a_random_twin_of_its_preset(table4_files,
                                                                                                   tmp_path):
    """Table 4's rows: table1's pair, a random mf-tiny, the README run's FINOLA and a random mf-nano; every step of
    them recorded, the command trains nothing (it would take minutes) and prints the five rows in that order."""
    table1, readme, _ = table4_files
    rows = ["finola-t1", "supervised-t1", "random-mf-tiny", "finola-readme", "random-mf-nano"]
    record(tmp_path / "t4", {f"{kind}shapes/{row}/seed0": {"final": {"AP": 0.1, "AP50": 0.2, "val_acc": 0.5},
                                                           "steps": 10, "train_s": 1.0}
                             for row in rows for kind in ("", "box/")})
    text = experiments("table4", "--table1", table1, "--finola", readme, "--data", "shapes", "--seeds", "0",
                       "--out", tmp_path / "t4").stdout
    names = ["FINOLA (table1's)", "supervised (table1's)", "random mf-tiny", "FINOLA (README's run)",
             "random mf-nano"]
    lines = [line for line in text.splitlines() if line.startswith("| shapes |")]
    assert [line.split(" | ")[1] for line in lines] == names
    assert "$ python train.py" not in text, "no run for a recorded step"


@pytest.mark.slow
def test_table4_says_which_file_is_missing_or_has_no_random_twin(table4_files, tmp_path):
    table1, readme, config = table4_files
    done = experiments("table4", "--table1", table1, "--data", "shapes", "--out", tmp_path / "a", check=False)
    assert done.returncode != 0 and "finola-readme" in done.stderr and "README's main command" in done.stderr
    custom = mobileformer.MobileFormer(dataclasses.replace(mobileformer.PRESETS["mf-nano"], name="custom"))
    path = weights.save_model(tmp_path / "custom.safetensors", autoencoder.Finola(custom, config), task="finola",
                              data="photos")
    done = experiments("table4", "--table1", table1, "--finola", path, "--data", "shapes", "--out", tmp_path / "b",
                       check=False)
    assert done.returncode != 0 and "not one of the Mobile-Former presets" in done.stderr


@pytest.mark.slow  # ~6 s: experiments.py run as a command, torch imported anew each time
def test_the_latent_table_sets_each_row_beside_its_pca_and_multi_path_beside_one_path(tmp_path):
    def run(psnr, pca, minutes=8.0):
        return {"final": {"psnr_db": psnr, "pca_db": pca}, "steps": 3000, "train_s": 60 * minutes}
    record(tmp_path, {"L256/1x256/seed0": run(22.0, 26.0), "L256/1x256/seed1": run(22.4, 26.0),
                      "L256/4x64/seed0": run(23.5, 26.0), "L256/4x64/seed1": run(23.7, 26.0),
                      "L64/1x64/seed0": run(20.0, 21.5), "pde/L256/4x64/seed0": {"speeds_real_fraction": 0.25}})
    text = experiments("table2a", "--print", "--out", tmp_path).stdout
    lines = [line for line in text.splitlines() if line.startswith("| 64 |") or line.startswith("| 256 |")]
    assert lines == ["| 64 | 1x64 | 20.00 (1) | 21.50 (1) | -1.50 (1) | 8.0 | – |",
                     "| 256 | 1x256 | 22.20 ± 0.28 (2) | 26.00 ± 0.00 (2) | -3.80 ± 0.28 (2) | 8.0 | – |",
                     "| 256 | 4x64 | 23.60 ± 0.14 (2) | 26.00 ± 0.00 (2) | -2.40 ± 0.14 (2) | 8.0 | 0.25 |"]
    assert ("latent 256: 4x64 paths above one path of 256 (the hidden-waves paper): **reproduced** (23.60 ± 0.14 "
            "(2) vs 22.20 ± 0.28 (2) dB)") in text
    done = experiments("table2a", "--latents", "100", "--paths", "3", "--out", tmp_path / "bad", check=False)
    assert done.returncode != 0 and "each latent must split into paths of a multiple of 8 channels" in done.stderr
