"""The FINOLA core (finola.py): the parallel expansion against the obviously-correct sequential one, gradients,
Eq. 3's shift, the moving-average variant, the PDE residual, and input checks."""
import math

import pytest
import torch
from torch.testing import assert_close

import autoencoder
import finola


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These are tiny ops: a second thread buys nothing, and beside another busy process its spin-waits made this
    file six times slower (44 s instead of 7 s on 2 cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def params64(C, *, seed=0, std=0.5):
    """Independent random matrices (not init's A_neg = -A), large enough to make the map vary a lot."""
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(C, C, generator=g, dtype=torch.float64) * std / math.sqrt(C) for k in finola.KEYS}


def q64(B, C, *, seed=1):
    return torch.randn(B, C, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def origins(H, W):
    """Centre, the four corners and the middle of the left edge."""
    return sorted({(H // 2, W // 2), (0, 0), (0, W - 1), (H - 1, 0), (H - 1, W - 1), (H // 2, 0)})


# Every origin on small maps of each shape (point, row, column, odd x even, even x even); the paper's 16 x 16 map,
# seconds per origin in the sequential form, only at its default centre origin and as a slow test.
CASES = [(size, o) for size in [(1, 1), (1, 7), (7, 1), (5, 8), (6, 4)] for o in origins(*size)]
CASES = [pytest.param(s, o, id=f"{s[0]}x{s[1]}-at{o[0]},{o[1]}") for s, o in CASES] + [
    pytest.param((16, 16), (8, 8), id="16x16-at8,8", marks=pytest.mark.slow)]


@pytest.mark.parametrize("size,origin", CASES)
def test_expand_equals_sequential(size, origin):
    p, q = params64(6), q64(2, 6)
    fast = finola.expand(p, q, size=size, origin=origin)
    slow = finola.expand_sequential(p, q, size=size, origin=origin)
    assert fast.shape == (2, 6, *size)
    assert_close(fast, slow, rtol=0, atol=1e-10)
    assert torch.equal(fast[:, :, origin[0], origin[1]], q), "the origin must hold q exactly"


@pytest.mark.parametrize("paths", [2, 3])
def test_multipath_expand_is_the_sum_of_single_path_expansions(paths):
    """Multi-path FINOLA: q (B, M C) as M vectors grown through the same A, B and summed; gradients too."""
    p, C, size, origin = params64(5), 5, (4, 6), (1, 4)
    q = q64(2, paths * C).requires_grad_()
    fast = finola.expand_paths(p, q, paths=paths, size=size, origin=origin)
    parts = q.reshape(2, paths, C)
    slow = sum(finola.expand(p, parts[:, i], size=size, origin=origin) for i in range(paths))
    assert fast.shape == (2, C, *size)
    assert_close(fast, slow, rtol=0, atol=1e-12)
    w = torch.randn_like(slow)
    (g_fast,) = torch.autograd.grad((fast * w).sum(), q)
    (g_slow,) = torch.autograd.grad((slow * w).sum(), q)
    assert_close(g_fast, g_slow, rtol=0, atol=1e-12)


def test_one_path_is_the_paper_s_finola_against_the_float64_reference():
    p, q = params64(6), q64(2, 6)
    one = finola.expand_paths(p, q, paths=1, size=(5, 4), origin=(2, 1))
    assert_close(one, finola.expand_sequential(p, q, size=(5, 4), origin=(2, 1)), rtol=0, atol=1e-10)
    with pytest.raises(ValueError, match=r"q: expected \(B, paths x C\) with paths=4, got \(2, 6\)"):
        finola.expand_paths(p, q, paths=4, size=(5, 4))
    with pytest.raises(ValueError, match="paths: expected a positive int, got 0"):
        finola.expand_paths(p, q, paths=0, size=(5, 4))


def test_expand_default_origin_is_centre():
    p, q = params64(4), q64(1, 4)
    z = finola.expand(p, q)
    assert z.shape == (1, 4, 16, 16)
    assert torch.equal(z[:, :, 8, 8], q)
    assert_close(z, finola.expand(p, q, origin=(8, 8)), rtol=0, atol=0)


def test_expand_value_is_eq3_shift_from_q():
    """Each position (r, c) is shift(q, u=c-c0, v=r-r0): Eq. 3's average of the two paths."""
    p, q = params64(5), q64(3, 5)
    z = finola.expand(p, q, size=(6, 7), origin=(2, 4))
    for r, c in [(0, 0), (5, 6), (2, 0), (4, 4), (0, 6)]:
        assert_close(z[:, :, r, c], finola.shift(p, q, c - 4, r - 2), rtol=0, atol=1e-12)


def test_expand_gradcheck():
    p = {k: v.requires_grad_() for k, v in params64(3).items()}
    q = q64(2, 3).requires_grad_()

    def f(q, *ws):
        return finola.expand(dict(zip(finola.KEYS, ws)), q, size=(4, 5), origin=(1, 3))

    assert torch.autograd.gradcheck(f, (q, *p.values()))


def test_expand_gradients_match_sequential():
    """The hand-written backward against autograd through the sequential form, on a larger map."""
    p, q = params64(8), q64(2, 8)
    g = torch.randn(2, 8, 9, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    grads = []
    for fn in (finola.expand, finola.expand_sequential):
        leaves = [q.clone().requires_grad_()] + [p[k].clone().requires_grad_() for k in finola.KEYS]
        z = fn(dict(zip(finola.KEYS, leaves[1:])), leaves[0], size=(9, 6), origin=(6, 1))
        grads.append(torch.autograd.grad((z * g).sum(), leaves))
    for a, b in zip(*grads):
        assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_expand_gradient_only_to_requested_inputs():
    p = params64(4)
    p["A"].requires_grad_()
    z = finola.expand(p, q64(1, 4), size=(3, 3))
    z.sum().backward()
    assert p["A"].grad is not None and p["A"].grad.abs().sum() > 0
    assert p["B"].grad is None


def test_batch_items_are_independent():
    p = params64(5)
    q = q64(4, 5).requires_grad_()
    z = finola.expand(p, q, size=(5, 4), origin=(1, 2))
    for i in range(4):
        assert_close(z[i:i + 1], finola.expand(p, q[i:i + 1].detach(), size=(5, 4), origin=(1, 2)),
                     rtol=0, atol=1e-12)
    (gq,) = torch.autograd.grad(z[1].sum(), q)
    assert gq[1].abs().sum() > 0
    assert torch.equal(gq[[0, 2, 3]], torch.zeros_like(gq[[0, 2, 3]]))


# --- Eq. 1 and Eq. 3 ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dim", [1, -1])
def test_normalize_is_eq1(dim):
    z = torch.randn(2, 7, 3, 4, dtype=torch.float64)
    zn = finola.normalize(z, dim=dim, eps=1e-6)
    mean = z.mean(dim, keepdim=True)
    var = ((z - mean) ** 2).mean(dim, keepdim=True)  # biased
    assert_close(zn, (z - mean) / torch.sqrt(var + 1e-6))


def test_step_is_z_plus_W_zn():
    z, W = torch.randn(3, 5, dtype=torch.float64), torch.randn(5, 5, dtype=torch.float64)
    assert_close(finola.step(z, W), z + finola.normalize(z) @ W.T)
    z4 = torch.randn(2, 5, 3, 4, dtype=torch.float64)
    manual = z4 + torch.einsum("ij,bjhw->bihw", W, finola.normalize(z4))
    assert_close(finola.step(z4, W), manual)


def test_shift_composes_with_step():
    p = params64(6)
    z = q64(3, 6)
    assert torch.equal(finola.shift(p, z, 0, 0), z)
    assert_close(finola.shift(p, z, 1, 0), finola.step(z, p["A"]), rtol=0, atol=0)
    assert_close(finola.shift(p, z, -1, 0), finola.step(z, p["A_neg"]), rtol=0, atol=0)
    assert_close(finola.shift(p, z, 0, 1), finola.step(z, p["B"]), rtol=0, atol=0)
    assert_close(finola.shift(p, z, 0, -1), finola.step(z, p["B_neg"]), rtol=0, atol=0)
    # Diagonal: the average of the two orders, which differ (norm+linear steps do not commute).
    xy = finola.step(finola.step(z, p["B"]), p["A"])
    yx = finola.step(finola.step(z, p["A"]), p["B"])
    assert (xy - yx).abs().max() > 1e-6
    assert_close(finola.shift(p, z, 1, 1), (xy + yx) / 2)


def test_shift_on_maps_is_elementwise():
    p = params64(4)
    z = torch.randn(2, 4, 3, 5, dtype=torch.float64)
    out = finola.shift(p, z, 2, -1)
    assert out.shape == z.shape
    for r, c in [(0, 0), (2, 4), (1, 3)]:
        assert_close(out[:, :, r, c], finola.shift(p, z[:, :, r, c], 2, -1))


# --- bf16 autocast --------------------------------------------------------------------------------------------------

def test_bf16_autocast_close_to_float32():
    torch.manual_seed(0)
    C = 64
    p = {k: v.requires_grad_() for k, v in finola.init(C, std=0.5 / math.sqrt(C)).items()}
    q = torch.randn(4, C, requires_grad=True)
    ref = finola.expand(p, q)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = finola.expand(p, q)
        assert finola.normalize(q.to(torch.bfloat16)).dtype == torch.float32
    assert low.dtype == torch.float32, "the map stays float32 under autocast"
    err = (low - ref).abs().max() / ref.abs().max()
    assert err < 3e-2, f"bf16 relative error {err:.3g}"
    low.square().mean().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all() and torch.isfinite(p["A"].grad).all()


# --- init ------------------------------------------------------------------------------------------------------------

def test_init_keys_shapes_and_seed():
    p = finola.init(16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert set(p) == set(finola.KEYS)
    assert all(v.shape == (16, 16) and v.dtype == torch.float64 for v in p.values())
    p2 = finola.init(16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert all(torch.equal(p[k], p2[k]) for k in finola.KEYS)
    assert torch.equal(p["A_neg"], -p["A"]) and torch.equal(p["B_neg"], -p["B"])
    assert_close(p["A"].std().item(), 0.1 / 4, rtol=0.2, atol=0)


@pytest.mark.parametrize("C", [64, 256, 1024, 4096])
def test_init_keeps_16x16_expansion_tame(C):
    """The property init's docstring argues: finite, growth at most linear (~2 * 0.1 per step in per-channel RMS),
    the map still varies, and float32 tracks float64 (no amplification of rounding)."""
    g = torch.Generator().manual_seed(C)
    p = finola.init(C, generator=g)
    q = torch.randn(2, C, generator=g)
    z = finola.expand(p, q)
    assert torch.isfinite(z).all()
    rms = z.square().mean(1).sqrt()  # per position (B, H, W)
    q_rms = q.square().mean(1).sqrt().view(2, 1, 1)
    assert (rms <= q_rms + 16 * 2 * 0.1 * 1.1).all(), f"max RMS {rms.max():.3g}"
    spread = (z - q.view(2, C, 1, 1)).square().mean(1).sqrt().mean()
    assert spread > 0.1, f"the map barely moves from q (mean RMS distance {spread:.3g})"
    z64 = finola.expand({k: v.double() for k, v in p.items()}, q.double())
    assert (z.double() - z64).abs().max() < 1e-4 * z64.abs().max()


# --- §4's moving-average normalization -----------------------------------------------------------------------------

def test_running_stats_and_moving_average_expand():
    z = torch.randn(4, 6, 5, 5, dtype=torch.float64) * 3 + 1
    batch = finola.running_stats(z)
    var, mean = torch.var_mean(z, dim=1, correction=0)
    assert_close(batch["mean"], mean.mean())
    assert_close(batch["var"], var.mean())
    running = {"mean": torch.tensor(0.0, dtype=torch.float64), "var": torch.tensor(1.0, dtype=torch.float64)}
    ema = finola.running_stats(z, running, momentum=0.25)
    assert_close(ema["mean"], 0.75 * 0 + 0.25 * batch["mean"])
    assert_close(ema["var"], 0.75 * 1 + 0.25 * batch["var"])

    p, q = params64(6), q64(2, 6)
    fast = finola.expand(p, q, size=(5, 6), origin=(1, 4), stats=batch)
    assert_close(fast, finola.expand_sequential(p, q, size=(5, 6), origin=(1, 4), stats=batch), rtol=0, atol=1e-10)
    assert (fast - finola.expand(p, q, size=(5, 6), origin=(1, 4))).abs().max() > 1e-3
    leaves = [q.clone().requires_grad_()] + [p[k].clone().requires_grad_() for k in finola.KEYS]
    assert torch.autograd.gradcheck(
        lambda q, *ws: finola.expand(dict(zip(finola.KEYS, ws)), q, size=(3, 4), origin=(2, 1), stats=batch), leaves)


def test_fixed_statistics_make_a_step_affine():
    """With running statistics the step no longer depends on z's own scale: f is affine, unlike Eq. 1's step."""
    W = torch.randn(5, 5, dtype=torch.float64)
    stats = {"mean": torch.tensor(0.3, dtype=torch.float64), "var": torch.tensor(2.0, dtype=torch.float64)}
    z1, z2 = torch.randn(2, 3, 5, dtype=torch.float64)
    mix = lambda f: f(0.3 * z1 + 0.7 * z2) - (0.3 * f(z1) + 0.7 * f(z2))  # noqa: E731
    assert_close(mix(lambda z: finola.step(z, W, stats=stats)), torch.zeros(3, 5, dtype=torch.float64))
    assert mix(lambda z: finola.step(z, W)).abs().max() > 1e-3


# --- Eq. 2 -------------------------------------------------------------------------------------------------------------

def test_pde_residual_vanishes_along_q_row_and_column():
    p, q = params64(6), q64(2, 6)
    r0, c0 = 3, 2
    z = finola.expand(p, q, size=(7, 6), origin=(r0, c0))
    rx, ry = finola.pde_residual(p, z)
    assert rx.shape == (2, 6, 7, 5) and ry.shape == (2, 6, 6, 6)
    assert rx[:, :, r0, c0:].abs().max() < 1e-12, "right of q on q's row, Eq. 1 holds exactly"
    assert ry[:, :, r0:, c0].abs().max() < 1e-12, "below q on q's column, Eq. 1 holds exactly"
    assert rx.abs().max() > 1e-3, "elsewhere the averaged paths are not an exact solution"


# --- bad input ------------------------------------------------------------------------------------------------------

def _bad_calls():
    p, q = params64(4), q64(2, 4)
    square = dict(p, A=torch.zeros(4, 3, dtype=torch.float64))
    missing = {k: p[k] for k in ("A", "B", "A_neg")}
    return [
        ("q: expected shape", ValueError, lambda: finola.expand(p, q[0])),
        ("q: expected shape", ValueError, lambda: finola.expand(p, q.view(2, 4, 1))),
        ("C=5", ValueError, lambda: finola.expand(p, q64(2, 5))),
        ("origin", ValueError, lambda: finola.expand(p, q, size=(4, 4), origin=(4, 0))),
        ("origin", ValueError, lambda: finola.expand(p, q, size=(4, 4), origin=(0, -1))),
        ("size", ValueError, lambda: finola.expand(p, q, size=(0, 4))),
        ("size", ValueError, lambda: finola.expand(p, q, size=(4,))),
        ("q: expected a floating dtype", TypeError, lambda: finola.expand(p, torch.ones(2, 4, dtype=torch.long))),
        ("params: expected a dict with keys", ValueError, lambda: finola.expand(missing, q)),
        ("params['A']: expected a square", ValueError, lambda: finola.expand(square, q)),
        ("params['B']: expected a floating", TypeError,
         lambda: finola.expand(dict(p, B=torch.ones(4, 4, dtype=torch.int32)), q)),
        ("z: expected shape", ValueError, lambda: finola.shift(p, q.view(2, 4, 1), 1, 0)),
        ("channels", ValueError, lambda: finola.init(0)),
        ("W: expected a square", ValueError, lambda: finola.step(q, torch.zeros(3, 3, dtype=torch.float64))),
    ]


@pytest.mark.parametrize("i", range(len(_bad_calls())))
def test_bad_input_names_the_argument(i):
    match, exc, call = _bad_calls()[i]
    with pytest.raises(exc, match=match.replace("[", r"\[").replace("]", r"\]")):
        call()


# --- the network (App. B, Table 10) ------------------------------------------------------------------------------

class StubEncoder(torch.nn.Module):
    """A stride-16 conv standing in for Mobile-Former: (B, 3, H, W) -> ((B, 12, H/16, W/16), tokens)."""
    out_channels = 12

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 12, 16, stride=16)

    def forward(self, x):
        return self.conv(x), torch.zeros(x.shape[0], 1, 4)


def tiny_model(**overrides):
    torch.manual_seed(0)
    config = autoencoder.FinolaConfig(channels=16, grid=(4, 4), widths=(16, 8, 8), heads=4,
                                 **overrides)
    return autoencoder.Finola(StubEncoder(), config)


def test_upsampler_scale_and_shape():
    up = finola.ConvUpsampler(16, (32, 16, 16, 8))
    assert up.scale == 8
    assert up(torch.randn(2, 16, 4, 5)).shape == (2, 3, 32, 40)


def test_linear_upsampler_maps_each_cell_to_its_own_patch():
    """Table 10's linear upsampler, checked against a loop over the cells: cell (r, c) alone makes the pixels
    [r p, (r + 1) p) x [c p, (c + 1) p)."""
    torch.manual_seed(0)
    up = finola.LinearUpsampler(16, patch=4)
    z = torch.randn(2, 16, 3, 5)
    y = up(z)
    assert up.scale == 4 and y.shape == (2, 3, 12, 20)
    for r in range(3):
        for c in range(5):
            patch = up.linear(z[:, :, r, c]).reshape(2, 3, 4, 4)
            assert_close(y[:, :, 4 * r:4 * r + 4, 4 * c:4 * c + 4], patch)


@pytest.mark.parametrize("position,origin", [("center", (2, 2)), ("top-left", (0, 0)), ("top-right", (0, 3)),
                                             ("bottom-left", (3, 0)), ("bottom-right", (3, 3))])
def test_model_puts_q_where_asked(position, origin):
    model = tiny_model(q_position=position).eval()
    x = torch.rand(2, 3, 16, 16)
    q = model.encode(x)
    z = model.expand(q)
    assert q.shape == (2, 16) and z.shape == (2, 16, 4, 4)
    assert torch.equal(z[:, :, origin[0], origin[1]], q)
    assert model(x).shape == x.shape


@pytest.mark.parametrize("output", autoencoder.OUTPUTS)
def test_output_parameterisation_is_a_fixed_affine_map_of_the_upsampler(output):
    model = tiny_model(output=output).eval()
    z = torch.randn(2, 16, 4, 4)
    y = model.upsampler(z)
    mean, std = torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1), torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)
    assert_close(model.decode(z), y * std + mean if output == "normalized" else y)
    # what it is for: with the last conv's output near 0, a fresh "normalized" model starts near the data's mean
    torch.nn.init.zeros_(model.upsampler[-1].weight)
    torch.nn.init.zeros_(model.upsampler[-1].bias)
    start = model.decode(z)
    assert_close(start, mean.expand_as(start) if output == "normalized" else torch.zeros_like(start))


def test_a_multipath_model_pools_m_vectors_and_sums_their_maps():
    model = tiny_model(paths=3).eval()
    x = torch.rand(2, 3, 16, 16)
    q = model.encode(x)
    assert model.latent == 48 and q.shape == (2, 48)
    z = model.expand(q)
    assert z.shape == (2, 16, 4, 4) and model(x).shape == x.shape
    assert_close(z, sum(finola.expand(dict(model.finola), q[:, 16 * i:16 * (i + 1)], size=(4, 4)) for i in range(3)))
    with pytest.raises(ValueError, match="paths: expected 1, or more with norm='layer'"):
        tiny_model(paths=2, norm="moving-average")


def test_model_rejects_wrong_images():
    with pytest.raises(ValueError, match=r"x: expected images \(B, 3, 16, 16\)"):
        tiny_model()(torch.rand(2, 3, 32, 32))
    with pytest.raises(ValueError, match="q_position"):
        tiny_model(q_position="middle")
    with pytest.raises(ValueError, match="norm"):
        tiny_model(norm="batch")
    with pytest.raises(ValueError, match="upsampler"):
        tiny_model(upsampler="pixel-shuffle")
    with pytest.raises(ValueError, match="output: expected one of"):
        tiny_model(output="rgb")


def test_moving_average_model_tracks_statistics_and_uses_them_at_inference():
    model = tiny_model(norm="moving-average", momentum=0.5)
    x = torch.rand(4, 3, 16, 16)
    model.train()
    z = model.expand(model.encode(x))
    expected = finola.running_stats(z.detach(), {"mean": torch.tensor(0.0), "var": torch.tensor(1.0)}, momentum=0.5)
    assert_close(model.running_mean, expected["mean"])
    assert_close(model.running_var, expected["var"])
    model.eval()
    before = model.running_mean.clone()
    q = model.encode(x)
    stats = {"mean": model.running_mean, "var": model.running_var}
    assert_close(model.expand(q), finola.expand(dict(model.finola), q, size=(4, 4), stats=stats))
    model.use_running_stats = False
    assert_close(model.expand(q), finola.expand(dict(model.finola), q, size=(4, 4)))
    assert torch.equal(model.running_mean, before), "inference leaves the statistics alone"


def test_per_position_norm_is_scoped_and_restored_on_error():
    """§4's ablation switch: inside the block a moving-average model normalizes per position at inference; the
    running statistics come back afterwards, also when the block raises."""
    model = tiny_model(norm="moving-average").eval()
    model.running_mean.fill_(3.0)  # statistics far from any map's own, so the two normalizations differ
    model.running_var.fill_(9.0)
    q = torch.randn(2, 16)
    running = model.expand(q)
    with model.per_position_norm():
        per_position = model.expand(q)
    assert not torch.allclose(running, per_position)
    with pytest.raises(RuntimeError, match="inside"):
        with model.per_position_norm():
            raise RuntimeError("inside")
    assert model.use_running_stats is True
    assert_close(model.expand(q), running)


def test_the_pooler_sees_positions_only_through_its_key_embedding():
    """The paper's pooler is blind to where a feature sits (q is the same for any order of the map's positions);
    with ``positions`` a learned embedding added to the keys tells them apart, and at zero it is the paper's."""
    torch.manual_seed(0)
    fmap = torch.randn(2, 8, 2, 3)
    flipped = fmap.flip(-1).flip(-2)
    plain = finola.AttentionPool(8, 16, heads=4)
    assert_close(plain(flipped), plain(fmap))
    placed = finola.AttentionPool(8, 16, heads=4, positions=(2, 3))
    placed.load_state_dict(plain.state_dict(), strict=False)
    assert placed.key_pos.shape == (1, 6, 8)
    assert (placed(flipped) - placed(fmap)).abs().max() > 1e-3
    with torch.no_grad():
        placed.key_pos.zero_()
    assert_close(placed(fmap), plain(fmap))


def test_the_pooler_s_positions_must_match_the_map():
    with pytest.raises(ValueError, match=r"fmap: the pooler's key positions are \(2, 2\), got a \(4, 4\) map"):
        finola.AttentionPool(8, 16, heads=4, positions=(2, 2))(torch.randn(1, 8, 4, 4))
    with pytest.raises(ValueError, match="positions: expected the map's"):
        finola.AttentionPool(8, 16, heads=4, positions=(2, 0))
    model = tiny_model(pool_positions=[1, 1])  # the stub encoder's map of 16² images; JSON gives lists
    assert model.config.pool_positions == (1, 1) and model(torch.rand(1, 3, 16, 16)).shape == (1, 3, 16, 16)
