"""Weights from the hub: ``hf:ORG/REPO[/FILE]`` resolves through huggingface_hub's cache, offline
from a pre-filled cache, with a clear error when the cache lacks it; ``eval.py export`` writes an uploadable folder."""
import json
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants

import eval as ev
import autoencoder
import mobileformer
import weights


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    torch.manual_seed(0)
    encoder = mobileformer.create("mf-tiny")
    config = autoencoder.FinolaConfig(channels=16, grid=(2, 2), widths=(8,) * 5)
    model = autoencoder.Finola(encoder, config)
    return weights.save_model(tmp_path_factory.mktemp("w") / "model.safetensors", model, task="finola",
                              data="photos", train={"lr": 0.008, "batch_size": 32}, metrics={"psnr_db": 20.84})


def fill_cache(repo: str, files: dict[str, bytes]):
    """What a download leaves in the hub cache: a snapshot folder and refs/main naming it."""
    root = Path(constants.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(commit)
    for name, content in files.items():
        path = root / "snapshots" / commit / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)


def test_hub_weights_load_offline_from_the_cache(tiny_file):
    assert constants.HF_HUB_OFFLINE, "the suite runs offline (conftest)"
    fill_cache("finola-test/tiny", {"model.safetensors": tiny_file.read_bytes(),
                                    "ckpt/other.safetensors": tiny_file.read_bytes()})
    local = weights.load_model(tiny_file)
    for name in ("hf:finola-test/tiny", "hf:finola-test/tiny/ckpt/other.safetensors"):
        model = weights.load_model(name)
        assert model.metadata["metrics"] == {"psnr_db": 20.84}
        assert all(torch.equal(v, local.state_dict()[k]) for k, v in model.state_dict().items())
    encoder = weights.load_encoder("hf:finola-test/tiny")  # what train.py --init hf:... uses
    assert all(p.requires_grad for p in encoder.parameters())


@pytest.mark.parametrize("name, message", [
    ("hf:finola-test/absent", r"not in the hub cache .* off \(HF_HUB_OFFLINE=1\)"),
    ("hf:finola-test", "expected hf:ORG/REPO or hf:ORG/REPO/FILE")])
def test_hub_weights_not_cached_offline_get_a_clear_error(name, message):
    with pytest.raises((FileNotFoundError, ValueError), match=message):
        weights.load_model(name)


def test_export_writes_an_uploadable_folder(tiny_file, tmp_path, capsys):
    result = ev.main(["export", "--weights", str(tiny_file), "--out", str(tmp_path / "up")])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == result
    up = tmp_path / "up"
    assert (up / "model.safetensors").read_bytes() == tiny_file.read_bytes()
    card = (up / "README.md").read_text()
    assert "| psnr_db | 20.84 |" in card and "--lr 0.008" in card and '"arch": "finola"' in card
    assert card.startswith("---\nlibrary_name: finola")
    assert weights.load_model(up / "model.safetensors").metadata["task"] == "finola"
