"""Tests run offline with a throw-away HuggingFace cache (set before anything imports `datasets`, which reads
these at import)."""
import os
import shutil
import tempfile

import numpy as np
import pytest
from PIL import Image

os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="finola-hf-")


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
