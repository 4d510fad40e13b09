"""experiments.py: the recorded steps of a study, skipped when run again, and the table and directions printed from
them (the studies themselves run for minutes to hours: benchmarks, not tests)."""
import experiments


def _row(top1):
    return {"final": {"top1": top1}}


def test_a_recorded_step_is_skipped_and_survives_a_restart(tmp_path):
    study = experiments.Study(tmp_path, threads=None)
    study.record("linprobe/random/seed0", run="x", **_row(0.5))
    again = experiments.Study(tmp_path, threads=None)
    assert again.done["linprobe/random/seed0"]["final"]["top1"] == 0.5
    assert again.train("linprobe/random/seed0", ["--never-run"]) == again.done["linprobe/random/seed0"]
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == 1


def test_the_table_reports_mean_and_std_over_seeds_and_marks_each_direction():
    done = {f"linprobe/{enc}/seed{s}": _row(v) for enc, values in
            {"finola": [0.70, 0.72, 0.74], "masked-b": [0.75, 0.77, 0.79], "masked-e": [0.60, 0.60, 0.60]}.items()
            for s, v in enumerate(values)}
    done["pretrain/finola"] = {"img_per_s": 250.0, "train_s": 1500.0, "steps": 11718,
                               "final": {"psnr_db": 18.3}}
    done["curvature"] = {"checkpoints": {"finola": {"score_topk_median": 1.26}}}
    text = experiments.markdown(done)
    finola = next(line for line in text.splitlines() if line.startswith("| finola |"))
    assert "| 250 | 25.0 | 6.25 | 18.30 dB |" in finola and "72.0 ± 2.0 % (3)" in finola and "| 1.26 |" in finola
    assert "masked FINOLA-B probes above vanilla FINOLA (linprobe): **reproduced** (77.0 ± 2.0 % (3) vs 72.0" in text
    assert "masked FINOLA-E probes above vanilla FINOLA (linprobe): **not reproduced**" in text
    assert "(tran1-probe): not measured yet" in text and "| mae | – | – | – | – |" in text
    assert "Fig. 5: masked FINOLA's top-16 curvature above vanilla FINOLA's (masked-e): not measured yet" in text
    done["curvature"]["checkpoints"]["masked-b"] = {"score_topk_median": 0.9}
    done["appd/finola"], done["appd/masked-b"] = {"final": {"psnr_db": 20.0}}, {"final": {"psnr_db": 18.5}}
    text = experiments.markdown(done)
    assert ("Fig. 5: masked FINOLA's top-16 curvature above vanilla FINOLA's (masked-b): **not reproduced** "
            "(0.90 vs 1.26)") in text
    assert "Table 1: masking lowers App. D PSNR (masked-b): **reproduced** (18.50 dB vs 20.00 dB)" in text


def test_the_detection_table_reports_ap_over_seeds_and_the_direction():
    done = {f"shapes/{enc}/seed{s}": {"final": {"AP": ap, "AP50": 2 * ap}, "steps": 2500, "train_s": 420.0}
            for enc, values in {"random": [0.10, 0.12, 0.14], "finola": [0.20, 0.20, 0.20]}.items()
            for s, ap in enumerate(values)}
    text = experiments.detection_markdown(done)
    assert "| shapes | random | 12.0 ± 2.0 (3) | 24.0 ± 4.0 (3) | 2500 | 7.0 |" in text
    assert "Table 4 on shapes: FINOLA-trained encoder above a random one (AP): **reproduced** (20.0 ± 0.0 (3)" in text
    assert "trees" not in text, "no row and no verdict for data not run"
