"""Shared by the tests: offline runs with a throw-away HuggingFace cache (set before anything imports `datasets`,
which reads these at import), the tiny training runs' flags, their records, and an image folder."""
import json
import os
import shutil
import tempfile

import numpy as np
import pytest
from PIL import Image

os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="finola-hf-")


# A tiny FINOLA run: 14 training rows (the 7 scikit-image photos x 2) in batches of 4, 4 validation crops; a 2x2
# FINOLA grid decoded to 32x32 by the preset's linear upsampler (16x16 patches), on the plain MSE (--spectral-loss
# fits a PCA of the training crops first: seconds a run).
TINY_FINOLA = ["--task", "finola", "--data", "photos", "--data-options",
               '{"crops_per_photo": 2, "with_wallpapers": false}', "--encoder", "mf-tiny", "--channels", "16",
               "--grid", "2", "--image-size", "32", "--batch-size", "4", "--lr", "0.05", "--warmup-epochs", "0",
               "--log-every", "1", "--pca-images", "0", "--spectral-loss", "0", "--optimizer", "adamw"]
# A tiny detector's data and model (add --task): 8 shapes images of 32², mf-tiny + mf-dec-tiny, 10 queries.
TINY_DETR = ["--data", "shapes", "--data-options", '{"n": 8, "size": 32}', "--encoder", "mf-tiny", "--decoder",
             "mf-dec-tiny", "--num-queries", "10", "--image-size", "32", "--batch-size", "4", "--log-every", "1"]


def records(run) -> list[dict]:
    """The records of a run folder's metrics.jsonl."""
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="session", autouse=True)
def _hf_home():
    yield os.environ["HF_HOME"]
    shutil.rmtree(os.environ["HF_HOME"], ignore_errors=True)


@pytest.fixture(scope="session")
def folder(tmp_path_factory):
    """An image folder: train/ and validation/ with 5 class folders of 32x32 images: labels 0-4, 2 training and
    1-3 validation images each (validation labels: 0, 1, 1, 2, 3, 3, 3, 4, 4 -> 9 images)."""
    root = tmp_path_factory.mktemp("classes")
    rng = np.random.default_rng(0)
    counts = {"train": [2] * 5, "validation": [1, 2, 1, 3, 2]}
    for split, per_class in counts.items():
        for c, n in enumerate(per_class):
            (root / split / f"c{c}").mkdir(parents=True)
            for k in range(n):
                image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) // 4 + 40 * c
                Image.fromarray(image).save(root / split / f"c{c}" / f"{k}.png")
    return root
