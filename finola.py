"""FINOLA: first-order norm+linear autoregression (the paper's §2, Eq. 1-5, Fig. 3), as pure functions.

Every image is encoded into one vector q; a feature map z grows from q by

    z(x+1, y) = z(x, y) + A z_n(x, y),      z(x, y+1) = z(x, y) + B z_n(x, y),                        (Eq. 1)
    z_n = (z - mean_C z) / sqrt(var_C z + eps)   (per position, over the C channels, biased variance),

with learned C x C matrices A, B and, for steps towards -x / -y, A_neg, B_neg (§2, "autoregression towards the left
and down"). In the continuum these are the PDEs dz/dx = A z_n, dz/dy = B z_n (Eq. 2).

Conventions (fixed; other modules rely on them): maps are (B, C, H, W), indexed z[b, c, row, col]; x is the column
(width) axis, y the row axis; A steps +x (right), A_neg -x (left), B +y (down), B_neg -y (up). The parameters are a
plain dict {"A", "B", "A_neg", "B_neg"} of (C, C) tensors; a step in batched row form is z + z_n @ W.T.

This file imports torch and the standard library only, so it can be copied alone; ``autoencoder.Finola`` is the
network of Fig. 1 around it.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


KEYS = ("A", "B", "A_neg", "B_neg")


# ---------------------------------------------------------------------------------------------------------------------
# Parameters and input checks
# ---------------------------------------------------------------------------------------------------------------------

def init(channels: int, *, std: float | None = None, generator: torch.Generator | None = None,
         dtype: torch.dtype | None = None, device=None) -> dict[str, torch.Tensor]:
    """Initial FINOLA matrices: A, B ~ N(0, std^2) with std = 0.1 / sqrt(C) by default; A_neg = -A, B_neg = -B.

    Why this keeps an expansion tame at any C: z_n has norm exactly sqrt(C) (eps aside), so one step moves z by
    |W z_n| <= |W|_2 sqrt(C). A C x C Gaussian matrix with entry std s has |W|_2 ~ 2 s sqrt(C) (Bai-Yin), so with
    s = g / sqrt(C) a step changes the per-channel RMS of z by at most ~2g (typically g), independent of C: growth
    over n steps is at most linear (2 n g), never exponential, because the normalization rescales every input.
    g = 0.1 keeps a 16x16 map (at most 16 steps from its centre) within ~3 of q's per-channel RMS while leaving it
    visibly varying. A_neg = -A, B_neg = -B makes the whole initial map one discretisation of Eq. 2 on both sides
    of q; the four matrices are trained independently afterwards.
    """
    if not isinstance(channels, int) or channels < 1:
        raise ValueError(f"channels: expected a positive int, got {channels!r}")
    dtype = dtype or torch.get_default_dtype()
    if not dtype.is_floating_point:
        raise TypeError(f"dtype: expected a floating dtype, got {dtype}")
    std = 0.1 / math.sqrt(channels) if std is None else std
    a, b = (torch.randn(channels, channels, generator=generator, dtype=dtype, device=device) * std for _ in range(2))
    return {"A": a, "B": b, "A_neg": -a, "B_neg": -b}


def _check_params(params, channels: int) -> None:
    if not isinstance(params, dict) or any(k not in params for k in KEYS):
        got = sorted(params) if isinstance(params, dict) else type(params).__name__
        raise ValueError(f"params: expected a dict with keys {list(KEYS)}, got {got}")
    for k in KEYS:
        w = params[k]
        if not torch.is_tensor(w) or w.dim() != 2 or w.shape[0] != w.shape[1]:
            shape = tuple(w.shape) if torch.is_tensor(w) else type(w).__name__
            raise ValueError(f"params[{k!r}]: expected a square (C, C) tensor, got {shape}")
        if not w.is_floating_point():
            raise TypeError(f"params[{k!r}]: expected a floating dtype, got {w.dtype}")
        if w.shape[0] != channels:
            raise ValueError(f"params[{k!r}] is ({w.shape[0]}, {w.shape[1]}) but the input has C={channels} channels")


def _check_float(name: str, t: torch.Tensor) -> None:
    if not torch.is_tensor(t):
        raise TypeError(f"{name}: expected a tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name}: expected a floating dtype, got {t.dtype}")


# ---------------------------------------------------------------------------------------------------------------------
# Eq. 1: normalization and one step
# ---------------------------------------------------------------------------------------------------------------------

def normalize(z: torch.Tensor, *, dim: int = 1, eps: float = 1e-6, stats: dict | None = None) -> torch.Tensor:
    """Eq. 1's z_n = (z - mean_C z) / sqrt(var_C z + eps) over ``dim`` (``layer_norm`` without affine).

    Computed in float32 (or wider) even under bf16 autocast; the result has that dtype. With ``stats`` =
    {"mean", "var"} (scalars from ``running_stats``) it is (z - mean) / sqrt(var + eps) instead: §4's
    moving-average variant, which at inference turns every step into a fixed affine map.
    """
    _check_float("z", z)
    dt = torch.promote_types(z.dtype, torch.float32)
    with torch.autocast(z.device.type, enabled=False):
        if stats is not None:
            return (z.to(dt) - stats["mean"].to(dt)) * torch.rsqrt(stats["var"].to(dt) + eps)
        x = z.movedim(dim, -1).to(dt)
        return F.layer_norm(x, x.shape[-1:], eps=eps).movedim(-1, dim)


def running_stats(z: torch.Tensor, running: dict | None = None, *, momentum: float = 0.1,
                  dim: int = 1) -> dict[str, torch.Tensor]:
    """Batch-norm's trick applied to Eq. 1's statistics (§4, "Is normalization necessary?").

    Returns the batch average of the per-position channel mean and (biased) variance of ``z`` as 0-d tensors;
    with ``running`` given, the exponential moving average ``(1 - momentum) * running + momentum * batch`` instead.
    Pure and gradient-free: the caller keeps the result (e.g. as module buffers) and passes it to ``normalize`` /
    ``expand`` as ``stats`` at inference.
    """
    _check_float("z", z)
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum: expected a value in [0, 1], got {momentum}")
    with torch.no_grad():
        x = z.detach().to(torch.promote_types(z.dtype, torch.float32))
        var, mean = torch.var_mean(x, dim=dim, correction=0)
        batch = {"mean": mean.mean(), "var": var.mean()}
        if running is None:
            return batch
        return {k: torch.lerp(running[k].to(batch[k]), batch[k], momentum) for k in ("mean", "var")}


def step(z: torch.Tensor, W: torch.Tensor, *, dim: int = 1, eps: float = 1e-6,
         stats: dict | None = None) -> torch.Tensor:
    """One first-order norm+linear step (Eq. 1): z + W z_n, with channels along ``dim``."""
    _check_float("z", z)
    _check_float("W", W)
    if W.dim() != 2 or W.shape[0] != W.shape[1] or W.shape[0] != z.shape[dim]:
        raise ValueError(f"W: expected a square ({z.shape[dim]}, {z.shape[dim]}) matrix, got {tuple(W.shape)}")
    zn = normalize(z, dim=dim, eps=eps, stats=stats).movedim(dim, -1)
    return z + (zn @ W.T).movedim(-1, dim)


def shift(params: dict, z: torch.Tensor, u: int, v: int, *, eps: float = 1e-6,
          stats: dict | None = None) -> torch.Tensor:
    """Eq. 3: z(x+u, y+v) from z(x, y) as (phi^u psi^v (z) + psi^v phi^u (z)) / 2.

    phi steps x with A (u > 0) or A_neg (u < 0), psi steps y with B (v > 0) or B_neg (v < 0). ``z`` is (B, C) or
    (B, C, h, w) (applied element-wise, as Masked-FINOLA-B's block-wise prediction does). shift(p, z, 0, 0) == z.
    """
    _check_float("z", z)
    if z.dim() not in (2, 4):
        raise ValueError(f"z: expected shape (B, C) or (B, C, h, w), got {tuple(z.shape)}")
    if not all(isinstance(n, int) for n in (u, v)):
        raise TypeError(f"u, v: expected ints, got {u!r}, {v!r}")
    _check_params(params, z.shape[1])

    def walk(t, n, pos, neg):
        for _ in range(abs(n)):
            t = step(t, params[pos] if n > 0 else params[neg], eps=eps, stats=stats)
        return t

    return (walk(walk(z, v, "B", "B_neg"), u, "A", "A_neg") + walk(walk(z, u, "A", "A_neg"), v, "B", "B_neg")) / 2


# ---------------------------------------------------------------------------------------------------------------------
# Fig. 3: expanding q into a map
# ---------------------------------------------------------------------------------------------------------------------

def _check_expand(params, q, size, origin):
    _check_float("q", q)
    if q.dim() != 2:
        raise ValueError(f"q: expected shape (B, C), got {tuple(q.shape)}")
    _check_params(params, q.shape[1])
    if (not isinstance(size, (tuple, list)) or len(size) != 2
            or not all(isinstance(s, int) and s >= 1 for s in size)):
        raise ValueError(f"size: expected (H, W) with positive ints, got {size!r}")
    H, W = size
    origin = (H // 2, W // 2) if origin is None else tuple(origin)
    if len(origin) != 2 or not all(isinstance(o, int) for o in origin) \
            or not (0 <= origin[0] < H and 0 <= origin[1] < W):
        raise ValueError(f"origin: expected (row, col) inside the {H}x{W} map, got {origin!r}")
    return (H, W), origin


def expand_sequential(params: dict, q: torch.Tensor, *, size=(16, 16), origin=None, eps: float = 1e-6,
                      stats: dict | None = None) -> torch.Tensor:
    """The obviously-correct slow form of ``expand``: every position walks from q on its own with ``shift``.

    z[:, :, row, col] = shift(params, q, col - origin_col, row - origin_row). For tests and as documentation.
    """
    (H, W), (r0, c0) = _check_expand(params, q, size, origin)
    cols = [torch.stack([shift(params, q, c - c0, r - r0, eps=eps, stats=stats) for c in range(W)], -1)
            for r in range(H)]
    return torch.stack(cols, -2)


def expand(params: dict, q: torch.Tensor, *, size=(16, 16), origin=None, eps: float = 1e-6,
           stats: dict | None = None) -> torch.Tensor:
    """Fig. 3's parallel FINOLA: grow a (B, C, H, W) map from q (B, C) placed at ``origin`` = (row, col).

    The default origin is (H // 2, W // 2), i.e. z(8, 8) = q in a 16x16 map. Two paths are averaged:
    horizontal-first (walk q's row with A / A_neg, then every column in parallel with B / B_neg) and vertical-first
    (q's column, then every row), so each position is Eq. 3's (phi^u psi^v + psi^v phi^u)(q) / 2, in O(H + W)
    batched steps. Equal to ``expand_sequential``. Under autocast the matmuls run in the autocast dtype while the
    map and its normalization stay in float32. The result is a channels_last tensor. ``stats`` as in ``normalize``.
    """
    size, origin = _check_expand(params, q, size, origin)
    mean, var = (None, None) if stats is None else (stats["mean"], stats["var"])
    return _Expand.apply(q, *(params[k] for k in KEYS), size, origin, eps, mean, var)


def expand_paths(params: dict, q: torch.Tensor, *, paths: int, size=(16, 16), origin=None, eps: float = 1e-6,
                 stats: dict | None = None) -> torch.Tensor:
    """Multi-path FINOLA (Chen et al., "On the Hidden Waves of Image", arXiv 2310.12976): q (B, M C) is M vectors
    q_i of C channels, each grown by ``expand`` through the same A, B, and the maps summed, z = sum_i z_i (a sum of
    special solutions of the wave equations). The M paths run as one batch of B M vectors; ``paths=1`` is ``expand``.
    """
    if not isinstance(paths, int) or paths < 1:
        raise ValueError(f"paths: expected a positive int, got {paths!r}")
    if paths == 1:
        return expand(params, q, size=size, origin=origin, eps=eps, stats=stats)
    if q.dim() != 2 or q.shape[1] % paths:
        raise ValueError(f"q: expected (B, paths x C) with paths={paths}, got {tuple(q.shape)}")
    z = expand(params, q.reshape(q.shape[0] * paths, -1), size=size, origin=origin, eps=eps, stats=stats)
    return z.unflatten(0, (q.shape[0], paths)).sum(1).contiguous(memory_format=torch.channels_last)


# The parallel form as one autograd Function: the forward writes every step straight into two preallocated maps
# (one per path, laid out so that each step's input and output are contiguous (N, C) matrices), and the backward
# walks the same steps in reverse. This avoids the stack/cat copies and per-step graph nodes of a plain version.

def _norm_fwd(x, eps, mean, var):
    """z_n of the rows of x (N, C) and what its backward needs."""
    if mean is None:
        n, mu, rstd = torch.native_layer_norm(x, x.shape[-1:], None, None, eps)
        return n, (mu, rstd)
    rstd = torch.rsqrt(var.to(x) + eps)
    return (x - mean.to(x)) * rstd, (None, rstd)


def _norm_bwd(gn, x, saved, eps):
    mu, rstd = saved
    if mu is None:
        return gn * rstd
    return torch.ops.aten.native_layer_norm_backward(gn, x, x.shape[-1:], mu, rstd, None, None,
                                                     [True, False, False])[0]


def _walk(X, o, Wp, Wn, eps, mean, var):
    """Fill X[o+1:] by steps with Wp and X[:o] by steps with Wn, from X[o]. X is (L, ..., C); Wp, Wn are W.T."""
    L = X.shape[0]
    C = X.shape[-1]
    for k in range(1, max(o, L - 1 - o) + 1):
        for i, prev, Wt in ((o + k, o + k - 1, Wp), (o - k, o - k + 1, Wn)):
            if 0 <= i < L:
                x, y = X[prev].view(-1, C), X[i].view(-1, C)
                n, _ = _norm_fwd(x, eps, mean, var)
                if n.dtype == Wt.dtype:
                    torch.addmm(x, n, Wt, out=y)
                else:  # autocast: matmul in the low precision, state kept in float32
                    torch.add(x, torch.mm(n.to(Wt.dtype), Wt), out=y)


def _walk_backward(X, G, o, Wp, Wn, gWp, gWn, eps, mean, var):
    """Reverse of ``_walk``: G holds dL/dX; propagate it back to G[o] and accumulate dL/dW (Wp, Wn are W)."""
    L = X.shape[0]
    C = X.shape[-1]
    for k in range(max(o, L - 1 - o), 0, -1):
        for i, prev, W, gW in ((o + k, o + k - 1, Wp, gWp), (o - k, o - k + 1, Wn, gWn)):
            if 0 <= i < L:
                x, gy, gx = X[prev].view(-1, C), G[i].view(-1, C), G[prev].view(-1, C)
                n, saved = _norm_fwd(x, eps, mean, var)
                gyw = gy.to(W.dtype)
                gW.add_(gyw.T @ n.to(W.dtype))
                gx.add_(gy).add_(_norm_bwd((gyw @ W).to(x.dtype), x, saved, eps))


class _Expand(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, A, B, A_neg, B_neg, size, origin, eps, mean, var):
        (H, W), (r0, c0) = size, origin
        Bsz, C = q.shape
        sd = torch.promote_types(q.dtype, torch.float32)  # dtype of the map (the state)
        dev = q.device.type
        md = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) and sd == torch.float32 else sd
        with torch.autocast(dev, enabled=False):
            Wt = {k: w.detach().to(md).T for k, w in zip(KEYS, (A, B, A_neg, B_neg))}
            # hp: horizontal-first path, hp[row, col, b]; vp: vertical-first path, vp[col, row, b].
            hp = q.new_empty((H, W, Bsz, C), dtype=sd)
            vp = q.new_empty((W, H, Bsz, C), dtype=sd)
            hp[r0, c0] = q.detach()
            vp[c0, r0] = q.detach()
            _walk(hp[r0], c0, Wt["A"], Wt["A_neg"], eps, mean, var)  # q's row
            _walk(hp, r0, Wt["B"], Wt["B_neg"], eps, mean, var)  # then all columns
            _walk(vp[c0], r0, Wt["B"], Wt["B_neg"], eps, mean, var)  # q's column
            _walk(vp, c0, Wt["A"], Wt["A_neg"], eps, mean, var)  # then all rows
            out = torch.empty((Bsz, H, W, C), dtype=sd, device=q.device)
            torch.lerp(hp.permute(2, 0, 1, 3), vp.permute(2, 1, 0, 3), 0.5, out=out)
        ctx.save_for_backward(hp, vp, A, B, A_neg, B_neg, mean, var)
        ctx.origin, ctx.eps, ctx.md = origin, eps, md
        return out.permute(0, 3, 1, 2)

    @staticmethod
    def backward(ctx, grad):
        hp, vp, *Ws, mean, var = ctx.saved_tensors
        (r0, c0), eps, md = ctx.origin, ctx.eps, ctx.md
        W = {k: w.to(md) for k, w in zip(KEYS, Ws)}
        gW = {k: torch.zeros_like(w, dtype=hp.dtype) for k, w in zip(KEYS, Ws)}
        half = grad.to(hp.dtype) * 0.5
        Gh = half.permute(2, 3, 0, 1).contiguous()  # (H, W, B, C) like hp
        Gv = half.permute(3, 2, 0, 1).contiguous()  # (W, H, B, C) like vp
        _walk_backward(hp, Gh, r0, W["B"], W["B_neg"], gW["B"], gW["B_neg"], eps, mean, var)
        _walk_backward(hp[r0], Gh[r0], c0, W["A"], W["A_neg"], gW["A"], gW["A_neg"], eps, mean, var)
        _walk_backward(vp, Gv, c0, W["A"], W["A_neg"], gW["A"], gW["A_neg"], eps, mean, var)
        _walk_backward(vp[c0], Gv[c0], r0, W["B"], W["B_neg"], gW["B"], gW["B_neg"], eps, mean, var)
        gq = Gh[r0, c0] + Gv[c0, r0]
        grads = [gW[k].to(w.dtype) if ctx.needs_input_grad[1 + i] else None for i, (k, w) in enumerate(zip(KEYS, Ws))]
        return (gq.to(grad.dtype) if ctx.needs_input_grad[0] else None, *grads, None, None, None, None, None)


# ---------------------------------------------------------------------------------------------------------------------
# Eq. 2: how far a map is from the PDEs
# ---------------------------------------------------------------------------------------------------------------------

def pde_residual(params: dict, z: torch.Tensor, *, eps: float = 1e-6,
                 stats: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Finite-difference residuals of Eq. 2 on a map z (B, C, H, W), with Eq. 1's forward differences.

    Returns (rx, ry): rx = z(x+1, y) - z(x, y) - A z_n(x, y), shape (B, C, H, W-1), and
    ry = z(x, y+1) - z(x, y) - B z_n(x, y), shape (B, C, H-1, W). Right of / below q on q's row / column an expanded
    map satisfies them exactly; elsewhere they measure how far the averaged two paths (and A_neg vs -A, B_neg vs -B
    on the left / upper side) are from one solution of the PDEs.
    """
    _check_float("z", z)
    if z.dim() != 4:
        raise ValueError(f"z: expected shape (B, C, H, W), got {tuple(z.shape)}")
    _check_params(params, z.shape[1])
    zn = normalize(z, eps=eps, stats=stats).movedim(1, -1)
    a = (zn @ params["A"].T).movedim(-1, 1)
    b = (zn @ params["B"].T).movedim(-1, 1)
    rx = z[..., :, 1:] - z[..., :, :-1] - a[..., :, :-1]
    ry = z[..., 1:, :] - z[..., :-1, :] - b[..., :-1, :]
    return rx, ry


# ---------------------------------------------------------------------------------------------------------------------
# FINOLA's parts around the recurrence: pooling q from a map, and the upsamplers (App. B, Table 10)
# ---------------------------------------------------------------------------------------------------------------------

Q_POSITIONS = ("center", "top-left", "top-right", "bottom-left", "bottom-right")


def q_origin(position: str, size) -> tuple[int, int]:
    """The (row, col) where q sits for a ``--q-position`` name (App. E.1 compares the centre and the corners)."""
    H, W = size
    table = {"center": (H // 2, W // 2), "top-left": (0, 0), "top-right": (0, W - 1),
             "bottom-left": (H - 1, 0), "bottom-right": (H - 1, W - 1)}
    if position not in table:
        raise ValueError(f"q_position: expected one of {Q_POSITIONS}, got {position!r}")
    return table[position]


def tokens(z: torch.Tensor) -> torch.Tensor:
    """A map's positions as a sequence: (B, C, H, W) -> (B, H W, C), row-major."""
    return z.flatten(2).transpose(1, 2)


class AttentionPool(nn.Module):
    """App. B "Pooling the compressed vector q": one multi-head attention layer whose learnable query attends over
    the encoder's output map (keys = values = the map's positions); the result is q in R^C.

    With ``positions`` = (h, w) (ours, not the paper's), a learned embedding of the map's h x w positions is added to
    the keys, not the values: each head can then read one region of the map by where it is, which the paper's
    pooler can only do through what the encoder writes there (EXPERIMENTS.md, issue 28)."""

    def __init__(self, in_channels: int, channels: int, *, heads: int = 8, positions: tuple = ()):
        super().__init__()
        if channels % heads:
            raise ValueError(f"heads: {heads} must divide channels={channels}")
        if positions and (len(positions) != 2 or min(positions) < 1):
            raise ValueError(f"positions: expected the map's (h, w) or (), got {tuple(positions)}")
        self.positions = tuple(positions)
        self.query = nn.Parameter(torch.randn(1, 1, channels) * channels ** -0.5)
        self.attn = nn.MultiheadAttention(channels, heads, kdim=in_channels, vdim=in_channels, batch_first=True)
        self.key_pos = (nn.Parameter(torch.randn(1, positions[0] * positions[1], in_channels)) if positions
                        else None)

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        kv = tokens(fmap)  # (B, h*w, C_enc)
        keys = kv
        if self.key_pos is not None:
            if tuple(fmap.shape[-2:]) != self.positions:
                raise ValueError(f"fmap: the pooler's key positions are {self.positions}, got a "
                                 f"{tuple(fmap.shape[-2:])} map")
            keys = kv + self.key_pos
        q, _ = self.attn(self.query.expand(kv.shape[0], -1, -1), keys, kv, need_weights=False)
        return q[:, 0]


def _group_norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(32, c // 4) if c >= 8 else 1, c, eps=1e-6)


class ResConv(nn.Module):
    """Table 10 "res-conv": a residual block of two 3x3 convs (VQGAN's layout: norm, swish, conv, twice), with a
    1x1 projection on the shortcut when the width changes."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.body = nn.Sequential(_group_norm(cin), nn.SiLU(), nn.Conv2d(cin, cout, 3, padding=1),
                                  _group_norm(cout), nn.SiLU(), nn.Conv2d(cout, cout, 3, padding=1))
        self.skip = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1)

    def forward(self, x):
        return self.skip(x) + self.body(x)


class UpConv(nn.Module):
    """Table 10 "up-conv": 2x nearest-neighbour upsampling followed by a 3x3 conv."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class ConvUpsampler(nn.Sequential):
    """Table 10's FINOLA upsampler: res-conv at the grid resolution, then (up-conv, res-conv) per doubling, then
    norm, swish and a 3x3 conv to RGB. ``widths`` are the res-conv widths; the paper's 16x16 -> 256x256 is
    (512, 256, 256, 128, 128), each up-conv keeping the width of the res-conv before it."""

    def __init__(self, in_channels: int, widths=(512, 256, 256, 128, 128), out_channels: int = 3):
        layers = [ResConv(in_channels, widths[0])]
        for prev, w in zip(widths, widths[1:]):
            layers += [UpConv(prev, prev), ResConv(prev, w)]
        layers += [_group_norm(widths[-1]), nn.SiLU(), nn.Conv2d(widths[-1], out_channels, 3, padding=1)]
        super().__init__(*layers)
        self.scale = 2 ** (len(widths) - 1)


def fold_patches(patches: torch.Tensor, grid, patch: int) -> torch.Tensor:
    """(B, gh gw, 3 p p) patch vectors in row-major grid order -> the (B, 3, gh p, gw p) image."""
    B = patches.shape[0]
    gh, gw = grid
    return patches.reshape(B, gh, gw, 3, patch, patch).permute(0, 3, 1, 4, 2, 5).reshape(B, 3, gh * patch, gw * patch)


class LinearUpsampler(nn.Module):
    """Table 10's "linear" upsampler (Masked-FINOLA-E's, "to facilitate longer training"): one linear layer maps
    each cell's C channels to its p x p x 3 patch of the image."""

    def __init__(self, channels: int, *, patch: int):
        super().__init__()
        self.patch = self.scale = patch
        self.linear = nn.Linear(channels, 3 * patch * patch)

    def patches(self, z: torch.Tensor) -> torch.Tensor:
        return self.linear(tokens(z))  # (B, H W, 3 p p)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return fold_patches(self.patches(z), z.shape[-2:], self.patch)
