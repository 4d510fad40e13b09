"""Tests run offline with a throw-away HuggingFace cache (set before anything imports `datasets`, which reads
these at import)."""
import os
import shutil
import tempfile

import pytest

os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="finola-hf-")


@pytest.fixture(scope="session", autouse=True)
def _hf_home():
    yield os.environ["HF_HOME"]
    shutil.rmtree(os.environ["HF_HOME"], ignore_errors=True)
