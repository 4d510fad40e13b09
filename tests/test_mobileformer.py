"""Mobile-Former encoders (mobileformer.py): shapes, stride, determinism, channels_last, safetensors, gradients,
input checks, and the parameter counts of Table 9's variants against the paper."""
import dataclasses
import json
import math

import pytest
import torch

import mobileformer as mf
import weights


def _model(name="mf-tiny", seed=0, **overrides):
    torch.manual_seed(seed)
    return mf.create(name, **overrides)


@pytest.fixture(scope="module")
def tiny():
    return _model().eval()


@pytest.mark.parametrize("hw", [(32, 32), (64, 64), (256, 256), (800, 1333), (33, 47)])
def test_small_variant_shapes_and_stride(tiny, hw):
    h, w = hw
    with torch.no_grad():
        out = tiny(torch.randn(1, 3, h, w), maps=True)
    assert out["features"].shape == (1, 240, math.ceil(h / 16), math.ceil(w / 16))
    assert out["stride16"].shape == (1, tiny.map_channels["stride16"], math.ceil(h / 16), math.ceil(w / 16))
    assert out["stride8"].shape == (1, tiny.map_channels["stride8"], math.ceil(h / 8), math.ceil(w / 8))
    assert out["tokens"].shape == (1, 6, 64)


@pytest.mark.parametrize("hw", [(32, 32), (64, 96), (33, 47)])
def test_nano_variant_is_the_stem_lite_and_three_downsampling_blocks(hw):
    """mf-nano (the small FINOLA preset's encoder): Mobile-Former's structure cut to bneck-lite and the three M-F↓
    blocks, still output stride 16, with its 1/8 map after the second M-F↓."""
    h, w = hw
    model = _model("mf-nano").eval()
    assert [type(b).__name__ for b in model.blocks] == ["LiteBottleneck"] + ["MobileFormerBlock"] * 3
    assert all(b.stride == 2 for b in model.blocks[1:])
    with torch.no_grad():
        out = model(torch.randn(2, 3, h, w), maps=True)
    assert out["features"].shape == (2, 384, math.ceil(h / 16), math.ceil(w / 16))
    assert out["stride8"].shape == (2, 40, math.ceil(h / 8), math.ceil(w / 8))
    assert out["tokens"].shape == (2, 4, 32)


def test_default_call_returns_features_and_tokens(tiny):
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        features, tokens = tiny(x)
        maps = tiny.forward_features(x)
    assert features.shape == (2, tiny.out_channels, 4, 6) and tokens.shape == (2, 6, 64)
    torch.testing.assert_close(features, maps["features"])
    torch.testing.assert_close(tokens, maps["tokens"])


@pytest.mark.parametrize("hw", [(32, 32), (64, 64), (256, 256), (800, 1333)])
def test_w720_shapes(hw):
    h, w = hw
    with torch.device("meta"):  # shape-only: meta tensors run the real code without the arithmetic
        model = mf.create("mf-w720")
        out = model(torch.empty(2, 3, h, w), maps=True)
    assert out["features"].shape == (2, 720, math.ceil(h / 16), math.ceil(w / 16))
    assert out["stride8"].shape == (2, 48, math.ceil(h / 8), math.ceil(w / 8))   # C/15 for the DETR decoder
    assert out["stride16"].shape == (2, 120, math.ceil(h / 16), math.ceil(w / 16))
    assert out["tokens"].shape == (2, 6, 192)


def test_w720_real_forward_at_256():
    model = _model("mf-w720").eval()
    with torch.no_grad():
        features, tokens = model(torch.randn(1, 3, 256, 256))
    assert features.shape == (1, 720, 16, 16) and tokens.shape == (1, 6, 192)
    assert torch.isfinite(features).all() and torch.isfinite(tokens).all()


def test_deterministic_init_under_seed():
    a, b, c = _model(seed=1), _model(seed=1), _model(seed=2)
    for (name, pa), pb, pc in zip(a.state_dict().items(), b.state_dict().values(), c.state_dict().values()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0, msg=name)
    assert not torch.equal(a.tokens, c.tokens)


def test_channels_last_matches_contiguous(tiny):
    x = torch.randn(2, 3, 64, 80)
    cl = _model().eval().to(memory_format=torch.channels_last)
    with torch.no_grad():
        f0, z0 = tiny(x)
        f1, z1 = cl(x.contiguous(memory_format=torch.channels_last))
    assert f1.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(f1, f0, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(z1, z0, rtol=1e-4, atol=1e-4)


def test_safetensors_round_trip_rebuilds_identical_model(tmp_path):
    model = _model("mf-tiny", num_classes=5)
    model.train()
    model(torch.randn(4, 3, 32, 32))  # move the BN running statistics away from their init
    model.eval()
    path = weights.save(tmp_path / "mf.safetensors", model.state_dict(), arch="mobileformer",
                        config=model.config_dict())
    loaded = weights.load_model(path)
    assert loaded.config == model.config and isinstance(loaded, mf.MobileFormer)
    x = torch.randn(2, 3, 48, 64)
    with torch.no_grad():
        a, b = model(x, maps=True), loaded(x, maps=True)
    for key in ("features", "tokens", "stride8", "logits"):
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=0)


def test_config_dict_round_trip_through_json():
    model = _model("mf-small")
    rebuilt = mf.MobileFormer.from_config(json.loads(json.dumps(model.config_dict())))
    assert rebuilt.config == model.config
    assert [(n, p.shape) for n, p in rebuilt.named_parameters()] == [(n, p.shape) for n, p in model.named_parameters()]


def test_gradients_reach_every_parameter():
    model = _model(num_classes=3)
    out = model(torch.randn(4, 3, 32, 48), maps=True)
    (out["logits"].square().mean() + out["features"].square().mean() + out["tokens"].square().mean()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"no gradient reached {missing}"
    assert model.tokens.grad.abs().sum() > 0


def test_backbone_without_classifier_has_no_head_parameters():
    bare, headed = _model(), _model(num_classes=10)
    assert bare.head is None and not any(n.startswith("head.") for n, _ in bare.named_parameters())
    assert sum(p.numel() for p in headed.parameters()) > sum(p.numel() for p in bare.parameters())
    assert headed.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_dynamic_relu_is_max_of_two_slopes():
    torch.manual_seed(0)
    act = mf.DynamicReLU(8, 16)
    x, z0 = torch.randn(3, 8, 5, 5), torch.randn(3, 16) * 10
    a, b = act.hyper(z0)[:, :, None, None].chunk(2, dim=1)
    torch.testing.assert_close(act(x, z0), torch.maximum(x * 2 * a, x * (2 * b - 1)))


def test_dynamic_relu_gradients_match_autograd_of_the_max_form():
    torch.manual_seed(0)
    act = mf.DynamicReLU(8, 16).double()
    x = torch.randn(3, 8, 5, 5, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    z0 = torch.randn(3, 16, dtype=torch.float64) * 10
    grad = torch.randn(3, 8, 5, 5, dtype=torch.float64)

    def grads(fn):
        xi, zi = x.clone().requires_grad_(), z0.clone().requires_grad_()
        act.zero_grad()
        fn(xi, zi).backward(grad)
        return [xi.grad, zi.grad] + [p.grad.clone() for p in act.parameters()]

    def reference(xi, zi):
        a, b = act.hyper(zi)[:, :, None, None].chunk(2, dim=1)
        return torch.maximum(xi * 2 * a, xi * (2 * b - 1))

    for ours, ref in zip(grads(act), grads(reference)):
        torch.testing.assert_close(ours, ref)


@pytest.mark.parametrize("x, message", [
    (torch.randn(3, 64, 64), "4-D"),
    (torch.randn(1, 1, 64, 64), "3 channels"),
    (torch.randn(1, 3, 31, 64), "smaller than 32"),
    (torch.randn(1, 3, 64, 16), "smaller than 32"),
])
def test_bad_input_gets_a_clear_error(tiny, x, message):
    with pytest.raises(ValueError, match=message):
        tiny(x)


def test_bad_names_and_configs_are_rejected():
    with pytest.raises(ValueError, match="name"):
        mf.create("mf-w9999")
    with pytest.raises(ValueError, match="overrides"):
        mf.create("mf-tiny", widht=3)
    cfg = mf.PRESETS["mf-tiny"]
    with pytest.raises(ValueError, match="three 'down'"):
        dataclasses.replace(cfg, blocks=cfg.blocks[:-6] + (("mf", 64, 48),))
    with pytest.raises(ValueError, match="token_dim"):
        dataclasses.replace(cfg, token_dim=66)


@pytest.mark.parametrize("name, paper_millions", [
    ("mf-w720", 4.9), ("mf-w1440", 11.7), ("mf-w2880", 25.0), ("mf-w4320", 43.5), ("mf-w5760", 67.6)])
def test_parameter_counts_match_the_paper(name, paper_millions):
    with torch.device("meta"):
        model = mf.create(name)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(params / paper_millions - 1) < 0.05, f"{name}: {params:.2f} M vs the paper's {paper_millions} M"


@pytest.mark.parametrize("zero", [False, True])
def test_zero_init_residual_makes_every_residual_branch_start_as_the_identity(zero):
    torch.manual_seed(0)
    model = mf.create("mf-tiny", zero_init_residual=zero).eval()
    x, z0 = torch.randn(2, 8, 16, 16), torch.randn(2, model.config.token_dim)
    residual = [b for b in model.blocks if getattr(b, "residual", False) or getattr(getattr(b, "mobile", None),
                                                                                    "residual", False)]
    assert len(residual) == 8, "bneck-lite and the seven M-F blocks with C_in = C_out"
    lite = model.blocks[0]
    out, _ = lite(x, None)
    assert torch.equal(out, x) == zero, "bneck-lite: x + 0 exactly when zero-initialised"
    for block in model.blocks:
        mobile = getattr(block, "mobile", None)
        if isinstance(mobile, mf.Bottleneck) and mobile.residual:
            h = torch.randn(2, mobile.expand.conv.in_channels, 4, 4)
            assert torch.equal(mobile(h, z0), h) == zero
        if isinstance(mobile, mf.DownBottleneck):
            assert (mobile.project2.bn.weight == 0).all() == zero, "M-F↓'s second branch"
    gammas = [m.weight for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all((g == 1).all() for g in gammas) != zero, "without the flag every BN starts at 1 (Mobile-Former's init)"
    rebuilt = mf.MobileFormer.from_config(model.config_dict())
    assert rebuilt.config.zero_init_residual == zero, "the flag round-trips through the saved config"


def test_down_shortcut_adds_a_linear_2x2_view_to_each_downsampling_block():
    plain, short = _model("mf-nano"), _model("mf-nano", down_shortcut=True)
    downs = [b.mobile for b in short.blocks if isinstance(getattr(b, "mobile", None), mf.DownBottleneck)]
    assert len(downs) == 3 and all(getattr(b, "mobile", None) is None or b.mobile.shortcut is None for b in plain.blocks)
    extra = sum(p.numel() for p in short.parameters()) - sum(p.numel() for p in plain.parameters())
    widths = [(16, 24), (24, 40), (40, 64)]  # M-F↓'s (C_in, C_out) in mf-nano
    assert extra == sum(4 * ci * co + 2 * co for ci, co in widths), "a 2x2 conv and its BN per M-F↓"
    down, z0 = downs[0].eval(), torch.randn(2, short.config.token_dim)
    x = torch.randn(2, 16, 9, 7)  # odd sides: the shortcut sees the input padded with zeros, as dw1 does
    with torch.no_grad():
        with_shortcut = down(x, z0)
        down.shortcut.bn.weight.zero_()
        down.shortcut.bn.bias.zero_()
        without = down(x, z0)
        down.shortcut = None
        assert with_shortcut.shape == (2, 24, 5, 4) and not torch.equal(with_shortcut, without)
        assert torch.equal(without, down(x, z0)), "a zeroed shortcut adds nothing"
    assert mf.MobileFormer.from_config(short.config_dict()).config.down_shortcut


@pytest.mark.parametrize("final_act", [True, False])
def test_final_act_decides_whether_the_output_map_can_go_negative(final_act):
    """The final 1x1 conv + BN ends in ReLU6 (values in [0, 6]) or, without it, is linear: the same weights give the
    pre-activation map, negatives included; the choice round-trips through the saved config."""
    torch.manual_seed(0)
    model = _model("mf-nano", final_act=final_act).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = model(x)[0]
        model.final.act = torch.nn.Identity()
        linear = model(x)[0]
    assert linear.min() < 0 and linear.max() > 0, "the pre-activation map has both signs"
    expected = linear if not final_act else linear.clamp(0, 6)
    torch.testing.assert_close(out, expected)
    assert mf.MobileFormer.from_config(model.config_dict()).config.final_act == final_act
    assert set(model.state_dict()) == set(_model("mf-nano", final_act=not final_act).state_dict()), \
        "the same weights either way: a file of one loads into the other"


def test_freeze_keeps_weights_and_batchnorm_statistics_through_train_mode():
    """The one way every model freezes its encoder: no gradients, eval mode that .train() keeps; freeze(False)
    undoes both (a parent's .train() then trains it)."""
    torch.manual_seed(0)
    model = mf.create("mf-tiny").freeze()
    parent = torch.nn.Sequential(model)
    parent.train()
    assert not model.training and not any(m.training for m in model.modules())
    assert not any(p.requires_grad for p in model.parameters())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model(torch.rand(2, 3, 32, 32) * 5)  # batch statistics far from the running ones
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()), "running statistics unchanged"
    model.freeze(False)
    parent.train()
    assert model.training and all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("shortcut", [False, True])
def test_a_padded_batch_gives_each_image_its_own_maps_and_zero_padding(shortcut):
    """forward_features(batch, mask) on images padded to one canvas = each image alone, on its own pixels (BN in eval
    mode), and zero on the padding; without the mask the padding leaks into the image's maps."""
    model = _model("mf-tiny", down_shortcut=shortcut).eval()
    for m in model.modules():  # statistics away from (0, 1), so that a wrong mask shows
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    images = [torch.randn(3, 70, 52), torch.randn(3, 48, 96)]
    x, mask = torch.zeros(2, 3, 70, 96), torch.ones(2, 70, 96, dtype=torch.bool)
    for i, image in enumerate(images):
        x[i, :, :image.shape[1], :image.shape[2]], mask[i, :image.shape[1], :image.shape[2]] = image, False
    with torch.no_grad():
        padded, leaky = model.forward_features(x, mask), model.forward_features(x)
        for i, image in enumerate(images):
            alone = model.forward_features(image[None])
            for name in ("stride8", "features"):
                h, w = alone[name].shape[2:]
                torch.testing.assert_close(padded[name][i, :, :h, :w], alone[name][0])
                outside = torch.ones(padded[name].shape[2:], dtype=torch.bool)
                outside[:h, :w] = False
                assert not padded[name][i][:, outside].any()
            torch.testing.assert_close(padded["tokens"][i], alone["tokens"][0])
        assert (leaky["tokens"][0] - model.forward_features(images[0][None])["tokens"][0]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="mask: expected a bool"):
        model.forward_features(x, mask[:, :-1])
