"""Mobile-Former encoders of the FINOLA paper (App. B, Table 9).

Every FINOLA experiment encodes images with Mobile-Former (Chen et al., CVPR 2022): a MobileNet-style stream of feature
maps and a handful of learned global *tokens* that talk to each other through light cross-attention. A block (M-F)
updates the pair (map x, tokens z) by Mobile→Former, Former, Mobile and Former→Mobile; M-F↓ is its stride-2 form and
bneck-lite leaves the tokens alone. The network: learned tokens, a stem, the 12 blocks of Table 9 and a final 1×1
conv; `num_classes > 0` adds Mobile-Former's classifier. Table 9 gives the widths; the block internals, which the
paper leaves to Mobile-Former, and its other open choices: PAPER_READING.md, Mobile-Former.

Variants (`create(name)`): Table 9's `mf-w720`, `mf-w1440`, `mf-w2880`; Table 2b's wider `mf-w4320`, `mf-w5760`;
ours for CPU runs, `mf-tiny` and `mf-small` (Table 9's 12 blocks, narrow) and `mf-nano` (the small FINOLA preset's:
stem, bneck-lite and the three M-F↓ blocks, 4 tokens of 32; why: EXPERIMENTS.md, the encoder's depth). Their sizes
against the paper's: EXPERIMENTS.md, Speed. Every variant accepts any H, W ≥ 32 (non-square too) and channels_last.

Multi-scale outputs: `model(x, maps=True)` or `model.forward_features(x)`, a dict of the 1/8, 1/16 and final maps
and the tokens; `model.map_channels` gives their widths. This file imports torch and the standard library only and
can be copied alone.
"""
from __future__ import annotations

import dataclasses
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

BLOCK_KINDS = ("lite", "down", "mf")


@dataclass(frozen=True, kw_only=True)
class MobileFormerConfig:
    """One Mobile-Former encoder. `blocks` rows are (kind, #exp, #out) as in Table 9: kind 'lite' (bneck-lite, stride
    1), 'down' (M-F↓, stride 2) or 'mf' (M-F, stride 1). Exactly three 'down' rows make the output stride 16."""
    name: str = "custom"
    stem_channels: int
    blocks: tuple[tuple[str, int, int], ...]
    final_channels: int
    token_num: int = 6
    token_dim: int
    down_expansion: int = 4          # e2 of M-F↓ (second depthwise expansion)
    hyper_reduction: int = 4         # DyReLU coefficient MLP: D → D/4 → 2·#exp
    bridge_heads: int = 2            # heads of Mobile→Former and Former→Mobile
    former_heads: int = 4
    ffn_ratio: int = 2
    in_channels: int = 3
    num_classes: int = 0             # > 0 adds Mobile-Former's classifier head
    head_channels: int = 1920        # hidden width of that head (Mobile-Former's `num_features`)
    head_dropout: float = 0.0
    zero_init_residual: bool = False  # ours (not the authors'): residual branches start at zero, see reset_parameters
    down_shortcut: bool = False      # ours: M-F↓ adds a linear 2×2/2 conv of its input, see DownBottleneck
    final_act: bool = True           # ReLU6 after the final 1×1 conv + BN (not stated in the paper; off: a linear map)

    def __post_init__(self):
        # JSON turns the tuples into lists: normalize so that MobileFormerConfig(**asdict(c)) == c.
        object.__setattr__(self, "blocks", tuple((str(k), int(h), int(o)) for k, h, o in self.blocks))
        if self.token_dim % self.former_heads or self.token_dim % self.hyper_reduction:
            raise ValueError(f"token_dim: {self.token_dim} must divide by former_heads={self.former_heads} "
                             f"and hyper_reduction={self.hyper_reduction}")
        if [k for k, _, _ in self.blocks].count("down") != 3:
            raise ValueError("blocks: need exactly three 'down' (M-F↓) rows for the output stride of 16")
        c_in = self.stem_channels
        for i, (kind, hidden, out) in enumerate(self.blocks):
            if kind not in BLOCK_KINDS:
                raise ValueError(f"blocks[{i}]: kind {kind!r} is not one of {BLOCK_KINDS}")
            if kind in ("lite", "down") and hidden % c_in:
                raise ValueError(f"blocks[{i}]: #exp {hidden} of a depthwise expansion must be a multiple of "
                                 f"its input width {c_in}")
            for width in (c_in, out):
                if kind != "lite" and width % self.bridge_heads:
                    raise ValueError(f"blocks[{i}]: width {width} must divide by bridge_heads={self.bridge_heads}")
            c_in = out


def _scaled(config: MobileFormerConfig, factor: float, name: str) -> MobileFormerConfig:
    """`config` with every channel count ×factor (stem, #exp, #out, final conv); tokens unchanged."""
    w = lambda c: int(round(c * factor))  # noqa: E731
    return dataclasses.replace(config, name=name, stem_channels=w(config.stem_channels),
                               blocks=tuple((k, w(h), w(o)) for k, h, o in config.blocks),
                               final_channels=w(config.final_channels))


# Table 9 (rows: bneck-lite; stage 2: M-F↓, M-F; stage 3: M-F↓, M-F×2; stage 4 at 1/16: M-F↓, M-F×5).
_W2880 = MobileFormerConfig(
    name="mf-w2880", stem_channels=64, token_dim=256, final_channels=2880,
    blocks=(("lite", 128, 64), ("down", 384, 112), ("mf", 336, 112), ("down", 672, 192), ("mf", 576, 192),
            ("mf", 576, 192), ("down", 1152, 352), ("mf", 1408, 352), ("mf", 1408, 352), ("mf", 2112, 480),
            ("mf", 2880, 480), ("mf", 2880, 480)))
PRESETS: dict[str, MobileFormerConfig] = {
    "mf-w720": MobileFormerConfig(
        name="mf-w720", stem_channels=16, token_dim=192, final_channels=720,
        blocks=(("lite", 32, 16), ("down", 96, 28), ("mf", 84, 28), ("down", 168, 48), ("mf", 144, 48),
                ("mf", 144, 48), ("down", 240, 80), ("mf", 320, 88), ("mf", 480, 88), ("mf", 528, 120),
                ("mf", 720, 120), ("mf", 720, 120))),
    "mf-w1440": MobileFormerConfig(
        name="mf-w1440", stem_channels=32, token_dim=256, final_channels=1440,
        blocks=(("lite", 64, 32), ("down", 192, 56), ("mf", 168, 56), ("down", 336, 96), ("mf", 288, 96),
                ("mf", 288, 96), ("down", 576, 176), ("mf", 704, 176), ("mf", 704, 176), ("mf", 1056, 240),
                ("mf", 1440, 240), ("mf", 1440, 240))),
    "mf-w2880": _W2880,
    "mf-w4320": _scaled(_W2880, 1.5, "mf-w4320"),
    "mf-w5760": _scaled(_W2880, 2.0, "mf-w5760"),
    # Ours: CPU-scale, same structure.
    "mf-tiny": MobileFormerConfig(
        name="mf-tiny", stem_channels=8, token_dim=64, final_channels=240, head_channels=512,
        blocks=(("lite", 16, 8), ("down", 48, 16), ("mf", 48, 16), ("down", 96, 24), ("mf", 72, 24),
                ("mf", 72, 24), ("down", 144, 32), ("mf", 128, 32), ("mf", 128, 32), ("mf", 192, 40),
                ("mf", 240, 40), ("mf", 240, 40))),
    "mf-nano": MobileFormerConfig(
        name="mf-nano", stem_channels=16, token_num=4, token_dim=32, final_channels=384, head_channels=512,
        blocks=(("lite", 32, 16), ("down", 96, 24), ("down", 144, 40), ("down", 240, 64))),
    "mf-small": MobileFormerConfig(
        name="mf-small", stem_channels=16, token_dim=96, final_channels=480, head_channels=1024,
        blocks=(("lite", 32, 16), ("down", 96, 24), ("mf", 72, 24), ("down", 144, 40), ("mf", 120, 40),
                ("mf", 120, 40), ("down", 240, 56), ("mf", 224, 56), ("mf", 224, 56), ("mf", 336, 80),
                ("mf", 480, 80), ("mf", 480, 80))),
}


# ---------------------------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------------------------
def conv_bn(c_in: int, c_out: int, kernel: int, *, stride: int = 1, groups: int = 1) -> nn.Sequential:
    """Conv (no bias) + BatchNorm, 'same' padding."""
    return nn.Sequential(OrderedDict(
        conv=nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=False),
        bn=nn.BatchNorm2d(c_out)))


def _heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, C) → (B, heads, N, C/heads): channel groups as heads."""
    b, n, c = t.shape
    return t.reshape(b, n, heads, c // heads).transpose(1, 2)


def _pixels(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) → (B, H·W, C); a free view for channels_last maps."""
    return x.flatten(2).transpose(1, 2)


# Padded batches (DETR's images of different sizes): ``keep`` (B, 1, H, W) is 1 on each image's own pixels and 0 on
# the padding (None: no padding). Every map is zeroed on the padding before a spatial op (3×3 convs) and attention
# never reads padded pixels, so an image's outputs on its own pixels do not depend on the padding (with BatchNorm in
# eval mode, whose statistics are fixed). Pointwise ops (1×1 convs, BN, activations) need no mask.
def keep_mask(mask: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """DETR's padding mask (B, H, W), True on padding → ``keep`` (B, 1, H, W), 1 on the image, 0 on padding."""
    return (~mask)[:, None].to(dtype)


def zero_padding(x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """``x`` with its padding zeroed, as a 3×3 conv's zero padding sees an unpadded image's border."""
    return x if keep is None else x * keep


def halve(keep: torch.Tensor | None, times: int = 1) -> torch.Tensor | None:
    """``keep`` after ``times`` 3×3 stride-2 convs (padding 1): output i is centred on input 2i, and belongs to the
    unpadded image's ⌈H/2⌉ outputs exactly when that input is one of its pixels."""
    return None if keep is None else keep[..., ::2 ** times, ::2 ** times]


def key_mask(keep: torch.Tensor | None) -> torch.Tensor | None:
    """``keep`` (B, 1, H, W) as an attention mask over the H·W pixels as keys: (B, 1, 1, H·W), True = attend."""
    return None if keep is None else keep.flatten(2)[:, None].bool()


class _TwoSlopes(torch.autograd.Function):
    """y = x · (neg + diff·[x > 0]) with per-(image, channel) slopes neg, diff ≥ 0. Fewer element-wise passes than
    autograd of the max-based form (against which it is tested), and no boolean kernels (slow on CPUs)."""

    @staticmethod
    def forward(ctx, x, neg, diff):
        step = torch.sign(x).clamp_(min=0)          # [x > 0] as floats (boolean kernels are slow on CPUs)
        slope = torch.addcmul(neg, step, diff)
        ctx.save_for_backward(x, step, slope)
        return x * slope

    @staticmethod
    def backward(ctx, grad):
        x, step, slope = ctx.saved_tensors
        gx = grad * x
        return grad * slope, gx.sum(dim=(2, 3), keepdim=True), (gx * step).sum(dim=(2, 3), keepdim=True)


class DynamicReLU(nn.Module):
    """Dynamic ReLU (Mobile-Former facts A3): y = max(k1·x, k2·x) per channel, k1 = 2a ∈ [0, 2], k2 = 2b − 1 ∈ [−1, 1],
    (a, b) = hsigmoid(MLP(z0)) from the first token, MLP D → D/r → 2C. No intercepts."""

    def __init__(self, channels: int, token_dim: int, *, reduction: int = 4):
        super().__init__()
        self.hyper = nn.Sequential(nn.Linear(token_dim, token_dim // reduction), nn.ReLU(),
                                   nn.Linear(token_dim // reduction, 2 * channels), nn.Hardsigmoid())

    def forward(self, x: torch.Tensor, z0: torch.Tensor) -> torch.Tensor:
        a, b = self.hyper(z0)[:, :, None, None].chunk(2, dim=1)   # (B, C, 1, 1) each
        k1, k2 = 2 * a, 2 * b - 1
        # max(k1·x, k2·x) = min(k1, k2)·x for x ≤ 0 and max(k1, k2)·x for x > 0
        return _TwoSlopes.apply(x, torch.minimum(k1, k2), (k1 - k2).abs())


class MobileToFormer(nn.Module):
    """Mobile→Former (A4): tokens attend over the pixels; keys = values = the raw map; dynamic gate; post-norm."""

    def __init__(self, channels: int, token_dim: int, *, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(token_dim, channels)
        self.gate = nn.Linear(token_dim, channels)
        self.proj = nn.Linear(channels, token_dim)
        self.norm = nn.LayerNorm(token_dim)

    def forward(self, x: torch.Tensor, z: torch.Tensor, keep: torch.Tensor | None = None, *,
                bias: torch.Tensor | None = None, query_pos: torch.Tensor | None = None) -> torch.Tensor:
        """``bias`` (B, 1, T, H·W), optional: added to the attention logits (a spatial prior); ``query_pos`` (B, T, D),
        optional: added to the tokens where they make the queries, not to the residual."""
        kv = _heads(_pixels(x), self.heads)                               # (B, h, HW, C/h)
        mask = key_mask(keep)
        if bias is not None:
            mask = bias if mask is None else bias.masked_fill(~mask, float("-inf"))
        q = self.q(z if query_pos is None else z + query_pos)
        out = F.scaled_dot_product_attention(_heads(q, self.heads), kv, kv, attn_mask=mask)
        out = out.transpose(1, 2).flatten(2) * (2 * F.hardsigmoid(self.gate(z)))   # (B, T, C)
        return self.norm(z + self.proj(out))


class Former(nn.Module):
    """Former (A5): token self-attention (keys = values = the tokens), then FFN D→2D→D; post-norms."""

    def __init__(self, dim: int, *, heads: int = 4, ffn_ratio: int = 2):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_ratio * dim), nn.GELU(), nn.Linear(ffn_ratio * dim, dim))
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, z: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        kv = _heads(z, self.heads)
        out = F.scaled_dot_product_attention(_heads(self.q(z), self.heads), kv, kv, attn_mask=attn_mask)
        z = self.norm1(z + self.proj(out.transpose(1, 2).flatten(2)))
        return self.norm2(z + self.ffn(z))


class FormerToMobile(nn.Module):
    """Former→Mobile (A6): raw pixels attend over the tokens (keys, values projected from the tokens); added to x."""

    def __init__(self, channels: int, token_dim: int, *, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.k = nn.Linear(token_dim, channels)
        self.v = nn.Linear(token_dim, channels)

    def forward(self, x: torch.Tensor, z: torch.Tensor, *, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``bias`` (B, 1, H·W, T), optional: added to the attention logits (a spatial prior)."""
        b, c, h, w = x.shape
        out = F.scaled_dot_product_attention(_heads(_pixels(x), self.heads), _heads(self.k(z), self.heads),
                                             _heads(self.v(z), self.heads), attn_mask=bias)  # (B, heads, HW, C/h)
        return x + out.transpose(1, 2).reshape(b, h, w, c).permute(0, 3, 1, 2)


class Bottleneck(nn.Module):
    """Mobile sub-block of M-F (A2): 1×1 → DyReLU → dw3×3 → DyReLU → 1×1, BN after each conv; residual if
    C_in = C_out."""

    stride = 1

    def __init__(self, c_in: int, hidden: int, c_out: int, token_dim: int, *, reduction: int = 4):
        super().__init__()
        self.expand = conv_bn(c_in, hidden, 1)
        self.act1 = DynamicReLU(hidden, token_dim, reduction=reduction)
        self.dw = conv_bn(hidden, hidden, 3, groups=hidden)
        self.act2 = DynamicReLU(hidden, token_dim, reduction=reduction)
        self.project = conv_bn(hidden, c_out, 1)
        self.residual = c_in == c_out

    def forward(self, x: torch.Tensor, z0: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        y = self.project(self.act2(self.dw(zero_padding(self.act1(self.expand(x), z0), keep)), z0))
        return x + y if self.residual else y


class DownBottleneck(nn.Module):
    """Mobile sub-block of M-F↓ (A7): dw3×3/2 (C_in→#exp) → DyReLU → 1×1 → s; dw3×3 (×e2) → DyReLU → 1×1; + s."""

    stride = 2

    def __init__(self, c_in: int, hidden: int, c_out: int, token_dim: int, *, expansion2: int = 4,
                 reduction: int = 4, shortcut: bool = False):
        super().__init__()
        hidden2 = expansion2 * c_out
        self.shortcut = nn.Sequential(OrderedDict(
            conv=nn.Conv2d(c_in, c_out, 2, 2, bias=False), bn=nn.BatchNorm2d(c_out))) if shortcut else None
        self.dw1 = conv_bn(c_in, hidden, 3, stride=2, groups=c_in)
        self.act1 = DynamicReLU(hidden, token_dim, reduction=reduction)
        self.project1 = conv_bn(hidden, c_out, 1)
        self.dw2 = conv_bn(c_out, hidden2, 3, groups=c_out)
        self.act2 = DynamicReLU(hidden2, token_dim, reduction=reduction)
        self.project2 = conv_bn(hidden2, c_out, 1)

    def forward(self, x: torch.Tensor, z0: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        s = self.project1(self.act1(self.dw1(x), z0))
        if self.shortcut is not None:  # every 2×2 block of x, linearly: (odd sides padded with zeros, as dw1 pads)
            s = s + self.shortcut(F.pad(x, (0, x.shape[-1] % 2, 0, x.shape[-2] % 2)))
        s = zero_padding(s, halve(keep))
        return s + self.project2(self.act2(self.dw2(s), z0))


class MobileFormerBlock(nn.Module):
    """M-F / M-F↓ (A1): Mobile→Former on the input map, Former, Mobile (DyReLU from token 0), Former→Mobile."""

    def __init__(self, mobile: nn.Module, c_in: int, c_out: int, config: MobileFormerConfig):
        super().__init__()
        d = config.token_dim
        self.mobile_to_former = MobileToFormer(c_in, d, heads=config.bridge_heads)
        self.former = Former(d, heads=config.former_heads, ffn_ratio=config.ffn_ratio)
        self.mobile = mobile
        self.former_to_mobile = FormerToMobile(c_out, d, heads=config.bridge_heads)
        self.stride = mobile.stride

    def forward(self, x: torch.Tensor, z: torch.Tensor,
                keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, z) → (x', z'); with ``keep`` (x's padding mask) x' is zero on its own padding (``halve(keep)`` for
        M-F↓)."""
        z = self.former(self.mobile_to_former(x, z, keep))
        x = self.former_to_mobile(self.mobile(x, z[:, 0], keep), z)
        return zero_padding(x, halve(keep) if self.stride == 2 else keep), z


class LiteBottleneck(nn.Module):
    """bneck-lite (A8, MicroNet): dw3×3 (C→#exp) + BN + ReLU6 → 1×1 + BN; identity residual; tokens unchanged."""

    stride = 1

    def __init__(self, c_in: int, hidden: int, c_out: int):
        super().__init__()
        self.dw = conv_bn(c_in, hidden, 3, groups=c_in)
        self.project = conv_bn(hidden, c_out, 1)
        self.residual = c_in == c_out

    def forward(self, x: torch.Tensor, z: torch.Tensor,
                keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.project(F.relu6(self.dw(x)))
        return zero_padding(x + y if self.residual else y, keep), z


class ClassifierHead(nn.Module):
    """Mobile-Former's classifier (A10): a last Mobile→Former on the last block's map; pooled final map (h-swish) and
    token 0 concatenated → Linear + BN + h-swish → dropout → Linear."""

    def __init__(self, c_last: int, c_final: int, config: MobileFormerConfig):
        super().__init__()
        d, hidden = config.token_dim, config.head_channels
        self.mobile_to_former = MobileToFormer(c_last, d, heads=config.bridge_heads)
        self.fc = nn.Sequential(nn.Linear(c_final + d, hidden), nn.BatchNorm1d(hidden), nn.Hardswish())
        self.dropout = nn.Dropout(config.head_dropout)
        self.classifier = nn.Linear(hidden, config.num_classes)

    def forward(self, last_map: torch.Tensor, features: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        z0 = self.mobile_to_former(last_map, z)[:, 0]
        pooled = F.hardswish(features.mean(dim=(2, 3)))
        return self.classifier(self.dropout(self.fc(torch.cat([pooled, z0], dim=1))))


# ---------------------------------------------------------------------------------------------------------------
# The encoder
# ---------------------------------------------------------------------------------------------------------------
class MobileFormer(nn.Module):
    """Mobile-Former encoder. `model(x)` → (features (B, C_out, ⌈H/16⌉, ⌈W/16⌉), tokens (B, T, D)); with a classifier
    (`num_classes > 0`) → logits (B, num_classes); `model(x, maps=True)` → dict (``forward_features``)."""

    arch = "mobileformer"  # its name in weights files (weights.architectures)

    min_size = 32

    def __init__(self, config: MobileFormerConfig):
        super().__init__()
        self.config = config
        c = config.stem_channels
        self.tokens = nn.Parameter(torch.empty(config.token_num, config.token_dim))
        self.stem = nn.Sequential(OrderedDict(
            conv=nn.Conv2d(config.in_channels, c, 3, 2, 1, bias=False), bn=nn.BatchNorm2d(c), act=nn.ReLU6()))
        blocks, stride, self._stride8_index = [], 2, -1
        for i, (kind, hidden, out) in enumerate(config.blocks):
            if kind == "lite":
                blocks.append(LiteBottleneck(c, hidden, out))
            else:
                mobile = (DownBottleneck(c, hidden, out, config.token_dim, expansion2=config.down_expansion,
                                         reduction=config.hyper_reduction, shortcut=config.down_shortcut)
                          if kind == "down" else
                          Bottleneck(c, hidden, out, config.token_dim, reduction=config.hyper_reduction))
                blocks.append(MobileFormerBlock(mobile, c, out, config))
            stride *= 2 if kind == "down" else 1
            self._stride8_index = i if stride == 8 else self._stride8_index
            c = out
        self.blocks = nn.ModuleList(blocks)
        self.final = nn.Sequential(OrderedDict(
            conv=nn.Conv2d(c, config.final_channels, 1, bias=False), bn=nn.BatchNorm2d(config.final_channels),
            act=nn.ReLU6() if config.final_act else nn.Identity()))
        self.head = ClassifierHead(c, config.final_channels, config) if config.num_classes > 0 else None
        self.map_channels = {"stride8": config.blocks[self._stride8_index][2], "stride16": c,
                             "features": config.final_channels}
        self.reset_parameters()

    @property
    def out_channels(self) -> int:
        return self.config.final_channels

    frozen = False

    def freeze(self, frozen: bool = True) -> "MobileFormer":
        """Probing (Table 13, App. C and D): no gradients, and BatchNorm statistics fixed (eval mode, which
        ``.train()`` keeps while frozen). The one way the classifier, FINOLA and DETR freeze their encoder;
        ``freeze(False)`` makes it trainable again (the owner's next ``.train()`` sets the mode)."""
        self.frozen = frozen
        self.requires_grad_(not frozen)
        return self.train(self.training)

    def train(self, mode: bool = True):
        return super().train(mode and not self.frozen)

    def reset_parameters(self):
        """Mobile-Former's init (A9): conv N(0, √(2/(k²·C_out))), BN (1, 0), Linear N(0, 0.01) with zero bias,
        tokens N(0, 1) (nn.Embedding's default), LayerNorm (1, 0). With ``zero_init_residual`` (ours; Goyal et al.'s
        trick for deep residual nets), the BN closing each residual branch (bneck-lite and M-F with C_in = C_out,
        M-F↓'s second branch) starts at γ = 0, so every such block starts as the identity and the stem's picture of
        the image reaches the last block intact (what it gains: EXPERIMENTS.md, the reconstruction ladder)."""
        nn.init.normal_(self.tokens)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, (2.0 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels)) ** 0.5)
            elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d, nn.LayerNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)
        if self.config.zero_init_residual:
            for m in self.modules():
                last = (m.project if isinstance(m, (Bottleneck, LiteBottleneck)) and m.residual else
                        m.project2 if isinstance(m, DownBottleneck) else None)
                if last is not None:
                    nn.init.zeros_(last.bn.weight)

    def config_dict(self) -> dict:
        """The config as a plain dict; `MobileFormer.from_config(model.config_dict())` rebuilds the architecture."""
        return dataclasses.asdict(self.config)

    @classmethod
    def from_config(cls, config: dict) -> "MobileFormer":
        """Inverse of `config_dict()` (weights.load_model), with a clear error for unknown fields."""
        fields = {f.name for f in dataclasses.fields(MobileFormerConfig)}
        unknown = sorted(set(config) - fields)
        if unknown:
            raise ValueError(f"config: unknown Mobile-Former config fields {unknown}")
        return cls(MobileFormerConfig(**config))

    def _check_input(self, x: torch.Tensor):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x: expected a 4-D (B, C, H, W) image tensor, got {shape}")
        if x.shape[1] != self.config.in_channels:
            raise ValueError(f"x: expected {self.config.in_channels} channels, got {x.shape[1]} "
                             f"(shape {tuple(x.shape)})")
        if min(x.shape[2:]) < self.min_size:
            raise ValueError(f"x: image {tuple(x.shape[2:])} is smaller than {self.min_size}×{self.min_size}")

    def forward_features(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """{"stride8": stage-3 output (⌈H/8⌉×⌈W/8⌉, C/15 channels for the Table 9 widths), "stride16": last block's
        output before the final conv, "features": final 1/16 map, "tokens"}.
        ``mask`` (B, H, W), True on padding (DETR's batches of images of different sizes): the maps are zero on
        their padding (``halve``), and each image's outputs are those it gets alone (BatchNorm in eval mode)."""
        self._check_input(x)
        keep = None
        if mask is not None:
            if mask.shape != (x.shape[0], *x.shape[2:]) or mask.dtype != torch.bool:
                raise ValueError(f"mask: expected a bool (B, H, W) = {(x.shape[0], *x.shape[2:])} padding mask, "
                                 f"got {mask.dtype} {tuple(mask.shape)}")
            keep = keep_mask(mask, x.dtype)
            x = zero_padding(x, keep)
        z = self.tokens.expand(x.shape[0], -1, -1)
        keep = halve(keep)
        x = zero_padding(self.stem(x), keep)
        maps = {}
        for i, block in enumerate(self.blocks):
            x, z = block(x, z, keep)
            keep = halve(keep) if block.stride == 2 else keep
            if i == self._stride8_index:
                maps["stride8"] = x
        maps["stride16"] = x
        maps["features"] = zero_padding(self.final(x), keep)
        maps["tokens"] = z
        return maps

    def forward(self, x: torch.Tensor, *, maps: bool = False):
        out = self.forward_features(x)
        if self.head is not None:
            out["logits"] = self.head(out["stride16"], out["features"], out["tokens"])
        if maps:
            return out
        return out["logits"] if self.head is not None else (out["features"], out["tokens"])


def create(name: str, **overrides) -> MobileFormer:
    """A fresh model from a preset of `PRESETS` (e.g. "mf-w720", "mf-tiny"); `overrides` replace config fields,
    e.g. `create("mf-w720", num_classes=1000)`."""
    if name not in PRESETS:
        raise ValueError(f"name: unknown Mobile-Former variant {name!r}; expected one of {sorted(PRESETS)}")
    fields = {f.name for f in dataclasses.fields(MobileFormerConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"overrides: unknown config fields {unknown}; expected some of {sorted(fields)}")
    return MobileFormer(dataclasses.replace(PRESETS[name], **overrides))
