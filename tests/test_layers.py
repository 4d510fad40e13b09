"""One input normalization for every model: a frozen encoder sees bit-identical inputs, and so
gives bit-identical features, through DETR, the classifier, FINOLA and Masked-FINOLA."""

import pytest
import torch
from torch.testing import assert_close

import autoencoder
import classify
import detr
import layers
import masked
import mobileformer
import weights


def capture(encoder):
    """The encoder's inputs and final maps, as each model's forward passes them."""
    seen = {"inputs": [], "maps": []}
    encoder.stem.register_forward_hook(lambda m, args, out: seen["inputs"].append(args[0].detach().clone()))
    encoder.final.register_forward_hook(lambda m, args, out: seen["maps"].append(out.detach().clone()))
    return seen


def test_a_frozen_encoder_gives_identical_features_through_every_model():
    torch.manual_seed(0)
    encoder = mobileformer.create("mf-tiny").eval().requires_grad_(False)
    x = torch.rand(2, 3, 32, 32)
    seen = capture(encoder)
    detector = detr.create(encoder, decoder="mf-dec-tiny", num_classes=3, num_queries=5, frozen=True).eval()
    detector(x)
    classifier = classify.Classifier(encoder, classify.ClassifierConfig(num_classes=3, frozen=True)).eval()
    classifier(x)
    fin = autoencoder.Finola(encoder, autoencoder.FinolaConfig(channels=16, grid=(2, 2), widths=(8,) * 5)).eval()
    fin.encode(x)
    masked_b = masked.MaskedFinolaB(encoder, masked.MaskedBConfig(
        channels=encoder.out_channels, grid=(4, 4), patch=16)).eval()
    x64 = torch.rand(2, 3, 64, 64)
    x64[:, :, :32, :32] = x  # the unmasked block at cell (0, 0): the top-left quarter, which is x
    masked_b.encode_block(x64, torch.zeros(2, 2, dtype=torch.long))
    assert len(seen["maps"]) == 4
    for name, inputs, maps in zip(("classifier", "finola", "masked-b"), seen["inputs"][1:], seen["maps"][1:]):
        assert torch.equal(inputs, seen["inputs"][0]), f"{name} feeds its encoder what DETR does"
        if name == "masked-b":  # its crop is a strided view (another memory layout, other conv kernels)
            assert_close(maps, seen["maps"][0], rtol=1e-5, atol=1e-6, msg=name)
        else:
            assert torch.equal(maps, seen["maps"][0]), name
    expected = (x - torch.tensor(layers.IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(
        layers.IMAGENET_STD).view(1, 3, 1, 1)
    assert_close(seen["inputs"][0], expected, rtol=0, atol=1e-6, msg="ImageNet's statistics, per channel")


def test_detr_files_written_before_the_fix_keep_raw_pixels(tmp_path):
    torch.manual_seed(0)
    model = detr.create("mf-tiny", decoder="mf-dec-tiny", num_classes=3, num_queries=5).eval()
    config = model.config_dict()
    assert config["normalize_input"] is True
    old = {k: v for k, v in config.items() if k != "normalize_input"}
    path = weights.save(tmp_path / "old.safetensors", model.state_dict(), arch="detr", config=old)
    loaded = weights.load_model(path)
    assert loaded.config.normalize_input is False
    seen = capture(loaded.backbone)
    x = torch.rand(1, 3, 32, 32)
    loaded(x)
    assert torch.equal(seen["inputs"][0], x), "an old detector's backbone sees the raw pixels it was trained on"
    again = weights.load_model(weights.save(tmp_path / "new.safetensors", model.state_dict(), arch="detr",
                                            config=config))
    assert again.config.normalize_input is True


@pytest.mark.parametrize("shape", [(3, 32, 32), (2, 1, 32, 32), (2, 3, 32, 31)])
def test_bad_image_shapes_get_one_message(shape):
    norm = layers.PixelNorm()
    with pytest.raises(ValueError, match=r"x: expected images \(B, 3, 32, 32\), got"):
        norm(torch.rand(shape), size=(32, 32))
