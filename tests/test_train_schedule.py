"""train.py's learning-rate schedule (``lr_at``) and gradient accumulation (``--grad-accum``)."""
import json
import math

import pytest
import torch
from safetensors.torch import load_file

import train

# (base lr, warm-up steps, total steps); total - warm-up is even, so the cosine has a midpoint step
SCHEDULES = [(1e-3, 4, 20), (0.5, 1, 9), (3.0, 10, 110)]


@pytest.mark.parametrize("base,warmup,total", SCHEDULES)
def test_warmup_is_linear_and_reaches_base_on_its_last_step(base, warmup, total):
    lrs = [train.lr_at(s, base=base, warmup=warmup, total=total) for s in range(warmup)]
    assert lrs == pytest.approx([base * (s + 1) / warmup for s in range(warmup)], rel=1e-12)
    assert lrs[-1] == pytest.approx(base, rel=1e-12)
    assert train.lr_at(warmup, base=base, warmup=warmup, total=total) == pytest.approx(base, rel=1e-12), \
        "the cosine starts where the warm-up ends"


@pytest.mark.parametrize("base,warmup,total", SCHEDULES)
def test_cosine_halves_at_its_midpoint_and_ends_near_zero(base, warmup, total):
    def lr(s):
        return train.lr_at(s, base=base, warmup=warmup, total=total)

    n = total - warmup
    assert lr(warmup + n // 2) == pytest.approx(base / 2, rel=1e-12)
    # the last step is one step short of the cosine's zero: base (1 + cos(pi (n-1)/n)) / 2 = base sin^2(pi / 2n)
    assert lr(total - 1) == pytest.approx(base * math.sin(math.pi / (2 * n)) ** 2, rel=1e-9)
    assert 0 < lr(total - 1) < 0.05 * base
    assert lr(total) == pytest.approx(0.0, abs=1e-15 * base)
    decay = [lr(s) for s in range(warmup, total)]
    assert all(a > b for a, b in zip(decay, decay[1:])), "strictly decreasing after the warm-up"


@pytest.mark.parametrize("base,warmup,total,drop", [(1e-4, 0, 50, 40), (0.2, 3, 12, 7), (1.0, 2, 10, 2)])
def test_step_schedule_drops_tenfold_from_the_drop_step(base, warmup, total, drop):
    lrs = [train.lr_at(s, base=base, warmup=warmup, total=total, drop=drop) for s in range(total)]
    expected = ([base * (s + 1) / warmup for s in range(warmup)] + [base] * (drop - warmup)
                + [0.1 * base] * (total - drop))
    assert lrs == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("drop", [None, 5])
def test_no_warmup_starts_at_base(drop):
    assert train.lr_at(0, base=0.3, warmup=0, total=10, drop=drop) == pytest.approx(0.3, rel=1e-12)
    assert train.lr_at(9, base=0.3, warmup=0, total=10, drop=drop) < 0.3


# --- gradient accumulation --------------------------------------------------------------------------------------

# 14 training rows; SGD without weight decay (its update is the gradient's, while Adam's first step only sees the
# gradient's sign); lr scaled by the global batch (4 in the runs compared); 2 steps, full batches of one epoch.
ACCUM_FLAGS = ["--task", "finola", "--data", "photos", "--data-options",
               '{"crops_per_photo": 2, "with_wallpapers": false}', "--no-augment", "--encoder", "mf-tiny",
               "--channels", "16", "--grid", "2", "--image-size", "32", "--widths", "16", "16", "16", "16", "16",
               "--optimizer", "sgd", "--lr", "3.2", "--weight-decay", "0", "--warmup-epochs", "0", "--max-steps", "2",
               "--log-every", "1", "--pca-images", "0", "--spectral-loss", "0", "--seed", "0", "--threads", "1"]


@pytest.fixture
def one_thread():
    """A tiny model gains nothing from a second thread, and beside another busy process its spin-waits made this
    test 30 times slower; train.py's --threads 1 sets the process's count, put back here."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _bn_stays_in_eval(self, mode=True):
    return torch.nn.Module.train(self, False)


@pytest.fixture
def update(tmp_path, monkeypatch, one_thread):
    """``update(name, *flags)``: a train.main run of ``ACCUM_FLAGS`` + flags with BatchNorm held in eval mode (batch
    statistics of different micro-batch sizes would differ for a reason that is not accumulation); returns the
    run's whole update (final minus initial weights, flattened), its metrics.jsonl records and every run's initial
    weights so far (recorded as train.py builds the model)."""
    monkeypatch.setattr(torch.nn.modules.batchnorm._BatchNorm, "train", _bn_stays_in_eval)
    task = train.TASKS["finola"]
    real_build, inits = task.build, []

    def recording_build(args):
        model = real_build(args)
        inits.append({k: v.detach().clone() for k, v in model.named_parameters()})
        return model

    monkeypatch.setattr(task, "build", recording_build)

    def run(name, *flags):
        out = tmp_path / name
        train.main(ACCUM_FLAGS + ["--out", str(out), *flags])
        final, init = load_file(out / "model.safetensors"), inits[-1]
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return torch.cat([(final[k] - init[k]).flatten() for k in sorted(init)]), rows, inits

    return run


def test_grad_accum_2_gives_the_update_of_twice_the_batch(update):
    """Through ``train.main`` (``--batch-size`` is the global batch): ``--batch-size 4 --grad-accum 2`` (micro-batches
    of 2) and ``--batch-size 4`` see the same images per step and must make the same 2 SGD updates (float tolerance).
    Control: a batch of 2 without accumulation at the same lr, i.e. half of each step's images, makes a clearly
    different update."""
    full, _, _ = update("full", "--batch-size", "4")
    accumulated, _, _ = update("accum", "--batch-size", "4", "--grad-accum", "2")
    half, _, inits = update("half", "--batch-size", "2", "--lr", "6.4")  # the same lr, one micro-batch per step
    assert all(torch.equal(inits[0][k], i[k]) for i in inits[1:] for k in inits[0]), "same initial weights"

    def distance(d):
        return ((d - full).norm() / full.norm()).item()

    assert full.norm() > 0
    assert distance(accumulated) < 1e-4, f"relative distance {distance(accumulated):.3g} to the full batch's update"
    assert distance(half) > 1e-1, "the tolerance tells the runs apart"


def test_a_short_last_step_weighs_every_image_alike_and_epochs_do_not_mix(update):
    """14 rows, --batch-size 8 --grad-accum 2: micro-batches of 4, 4, 4, 2 make 2 steps an epoch, the second of 6
    images in a 4 + 2 split. Its update equals that of one batch of 6 (the 2 images do not count double), and each
    epoch logs all 14 images (no step mixes two epochs). Compared as in the test above, on the whole update."""
    whole, _, _ = update("whole", "--batch-size", "8", "--max-steps", "4")  # the same data order: 8 + 6 an epoch
    accumulated, rows, _ = update("accum", "--batch-size", "8", "--max-steps", "4", "--grad-accum", "2")
    assert [(r["epoch"], r["samples"]) for r in rows if "samples" in r] == [(0, 14), (1, 14)]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    distance = ((accumulated - whole).norm() / whole.norm()).item()
    assert distance < 1e-4, f"relative distance {distance:.3g} to whole batches' update"
