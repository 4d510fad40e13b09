"""Our safetensors format (weights.py): metadata that rebuilds a model, and clear errors for anything else."""
import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.testing import assert_close

import autoencoder
import mobileformer
import weights


def test_round_trip_rebuilds_the_model_from_the_file_alone(tmp_path):
    torch.manual_seed(0)
    model = mobileformer.create("mf-tiny").eval()
    path = weights.save(tmp_path / "m.safetensors", model.state_dict(), arch="mobileformer",
                        config=model.config_dict(), task="none", train={"lr": 1e-3}, data="photos",
                        metrics={"psnr_db": 1.5})
    meta = weights.read_metadata(path)
    assert meta["format"] == weights.FORMAT and meta["train"] == {"lr": 1e-3} and meta["metrics"]["psnr_db"] == 1.5
    rebuilt = weights.load_model(path)
    x = torch.rand(1, 3, 32, 32)
    assert_close(rebuilt(x)[0], model(x)[0], rtol=0, atol=0)
    assert not list(tmp_path.glob(".*tmp")), "the temporary file is renamed into place"


@pytest.mark.parametrize("upsampler", autoencoder.UPSAMPLERS)
def test_finola_file_rebuilds_its_upsampler(tmp_path, upsampler):
    """Either of Table 10's upsamplers comes back from the file's config (a file without the field: "conv")."""
    torch.manual_seed(0)
    encoder = mobileformer.create("mf-tiny")
    config = autoencoder.FinolaConfig(channels=16, grid=(4, 4), heads=4,
                                 upsampler=upsampler, widths=(16, 8, 8, 8), patch=8)
    model = autoencoder.Finola(encoder, config).eval()
    saved = model.config_dict()
    if upsampler == "conv":
        del saved["upsampler"], saved["patch"]  # as files written before the linear upsampler
    path = weights.save(tmp_path / "f.safetensors", model.state_dict(), arch="finola", config=saved)
    rebuilt = weights.load_model(path)
    assert type(rebuilt.upsampler) is type(model.upsampler)
    x = torch.rand(2, 3, 32, 32)
    assert_close(rebuilt(x), model(x), rtol=0, atol=0)


def test_foreign_and_missing_files_get_clear_errors(tmp_path):
    save_file({"w": torch.zeros(2)}, tmp_path / "other.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="not a finola weights file"):
        weights.load_model(tmp_path / "other.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors at all")
    with pytest.raises(ValueError, match="is not a safetensors file"):
        weights.read_metadata(tmp_path / "junk.safetensors")
    with pytest.raises(FileNotFoundError, match="no such file"):
        weights.read_metadata(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="unknown architecture"):
        weights.save(tmp_path / "x.safetensors", {}, arch="resnet", config={})


def test_load_encoder_drops_a_classifier(tmp_path):
    model = mobileformer.create("mf-tiny", num_classes=5)
    path = weights.save(tmp_path / "c.safetensors", model.state_dict(), arch="mobileformer",
                        config=model.config_dict())
    encoder = weights.load_encoder(path)
    assert encoder.head is None and encoder.config.num_classes == 0
    features, tokens = encoder.eval()(torch.rand(1, 3, 32, 32))
    assert features.shape == (1, encoder.out_channels, 2, 2)


V1 = ("mobileformer", "finola", "finola-linear", "masked-e", "masked-b", "classifier", "detr")


@pytest.mark.parametrize("name", V1)
def test_files_written_before_the_model_contract_still_load(name):
    """tests/data/weights-v1 was written by the code of commit 51b212b, before every model got ``from_config`` /
    ``config_dict``: one small model of each architecture (configs with ``encoder_channels``, DETR's
    encoder under ``backbone``), with its output on a fixed input. Each still loads and gives the same output."""
    root = Path(__file__).parent / "data" / "weights-v1"
    expected = load_file(root / "expected.safetensors")
    model = weights.load_model(root / f"{name}.safetensors")
    with torch.no_grad():
        y = model(expected[f"{name}.input"])
    y = y[0] if isinstance(y, tuple) else y["pred_boxes"] if isinstance(y, dict) else y
    assert_close(y, expected[f"{name}.output"], rtol=1e-5, atol=1e-6)
    assert weights.load_encoder(root / f"{name}.safetensors").out_channels == 24


@pytest.mark.parametrize("name", V1)
def test_every_model_follows_one_contract(name):
    """Issue 15's contract: a frozen keyword-only config; its file's config through JSON (``weights.build``:
    ``split``, the encoder, then ``Model.from_config``) rebuilds the same config and tensors; ``weights.arch_of``
    names the class the file's arch names."""
    model = weights.load_model(Path(__file__).parent / "data" / "weights-v1" / f"{name}.safetensors")
    fields = dataclasses.fields(model.config)
    assert type(model.config).__dataclass_params__.frozen and all(f.kw_only for f in fields), type(model.config)
    again = weights.build(json.loads(json.dumps(model.metadata["model"])))
    assert again.config == model.config and again.config_dict() == model.config_dict()
    assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    assert weights.arch_of(model) == model.metadata["model"]["arch"]
    if name != "mobileformer":
        saved = model.config_dict()
        assert saved["encoder"] == model.encoder.config_dict() and "encoder_channels" not in saved
