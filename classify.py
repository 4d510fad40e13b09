"""Classification decoders on a (pre-trained) Mobile-Former encoder (the paper's App. B "Decoders for ImageNet
classification", App. C Tables 13-14; Tables 1, 3, 5-7, 15).

    lin     BatchNorm1d(affine=False) + Linear on the globally pooled final map (linear probing; the extra
            BatchNorm without affine follows MAE, App. C "Linear probing")
    tran-1  1 transformer block + a linear classifier (tran-1 probing and fine-tuning)
    tran-4  4 transformer blocks + a linear classifier (fine-tuning only, Table 7)

The transformer decoders project every position of the encoder's final 1/16 map (e.g. 14 x 14 at 224^2) to the
decoder width (192 / 384 / 768 for MF-W720 / W1440 / W2880, App. B and C; 64 / 96 for our CPU encoders mf-tiny /
mf-small), run pre-norm ViT blocks (MLP 4x, width/64 heads) without positional embedding, average the tokens, and
classify. With these choices the parameter counts land on the paper's (1000 classes): MF-W720 / W1440 / W2880 +
tran-4 = 7.07 / 19.84 / 56.44 M (Table 7: 7 / 20 / 57 M); W720 / W2880 + lin = 5.68 / 27.99 M (Table 6: 6 / 28 M;
its 14 M for W1440 + lin is 0.8 M above our 13.24 M, unexplained).

``frozen=True`` (linear and tran-1 probing: "The encoders are frozen during both tasks", Table 13) really freezes the
encoder: no parameter requires a gradient, it runs without autograd, and it stays in eval mode (BatchNorm uses and
keeps its running statistics) even when ``.train()`` is called on the classifier (``MobileFormer.freeze``).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

import layers

DECODERS = {"lin": 0, "tran-1": 1, "tran-4": 4}  # decoder name -> its transformer blocks

# encoder -> (decoder width, dropout of tran-1 probing / fine-tuning): App. B, Table 13; mf-tiny / mf-small and MAE's
# vit-tiny (its own width) are ours.
WIDTHS = {"mf-w720": (192, 0.1), "mf-w1440": (384, 0.2), "mf-w2880": (768, 0.2), "mf-small": (96, 0.1),
          "mf-tiny": (64, 0.1), "vit-tiny": (192, 0.1)}


@dataclass(frozen=True, kw_only=True)
class ClassifierConfig:
    """An encoder and a classification decoder. ``width`` / ``dropout`` of tran-N default from ``WIDTHS`` by the
    encoder's name (``for_encoder``, which ``Classifier`` applies)."""
    num_classes: int = 1000
    decoder: str = "lin"                    # one of DECODERS (train.py --decoder)
    width: int | None = None                # transformer decoder width
    heads: int | None = None                # attention heads (width / 64, at least 2)
    dropout: float | None = None            # before the classifier (and in the blocks' MLP) of tran-N
    frozen: bool = False                    # probing: the encoder is fixed
    feature_norm: bool = False              # tran-N: BatchNorm (no affine) on the map's channels first (ours, below)
    mean: tuple = layers.IMAGENET_MEAN  # input normalization of [0, 1] images for the encoder (PixelNorm)
    std: tuple = layers.IMAGENET_STD

    def __post_init__(self):
        if self.decoder not in DECODERS:
            raise ValueError(f"decoder: expected one of {sorted(DECODERS)}, got {self.decoder!r}")
        if self.num_classes < 2:
            raise ValueError(f"num_classes: expected at least 2, got {self.num_classes}")
        layers.frozen_fields(self, mean=tuple(self.mean), std=tuple(self.std))
        if self.decoder == "lin" and self.dropout is None:
            layers.frozen_fields(self, dropout=0.0)

    def for_encoder(self, name: str | None) -> "ClassifierConfig":
        """This config with tran-N's width, dropout and heads filled in: ``WIDTHS[name]`` where not given."""
        if self.decoder == "lin" or None not in (self.width, self.dropout, self.heads):
            return self
        width, dropout = self.width, self.dropout
        if width is None or dropout is None:
            if name not in WIDTHS:
                raise ValueError(f"width / dropout: no default for encoder {name!r} (defaults exist for "
                                 f"{sorted(WIDTHS)}); pass them")
            width = WIDTHS[name][0] if width is None else width
            dropout = WIDTHS[name][1] if dropout is None else dropout
        return dataclasses.replace(self, width=width, dropout=dropout, heads=self.heads or max(2, width // 64))


class Classifier(layers.EncoderModel):
    """Encoder -> decoder -> logits. ``model(x)`` takes images in [0, 1] (B, 3, H, W); ``encoder(x)`` must return
    ``(feature_map, tokens)`` (a Mobile-Former without classifier head)."""

    arch = "classifier"  # its name in weights files (weights.architectures)

    Config = ClassifierConfig
    RENAMED = {**layers.EncoderModel.RENAMED, "head": "decoder"}  # files before the contract

    def __init__(self, encoder: nn.Module, config: ClassifierConfig):
        super().__init__()
        self.config = config = config.for_encoder(getattr(encoder.config, "name", None))
        self.encoder = encoder
        self.pixels = layers.PixelNorm(config.mean, config.std)
        C, K = encoder.out_channels, config.num_classes
        if config.decoder == "lin":
            self.norm = nn.BatchNorm1d(C, affine=False, eps=1e-6)
            self.classifier = nn.Linear(C, K)
            nn.init.trunc_normal_(self.classifier.weight, std=0.01)  # MAE's linear-probe init
            nn.init.zeros_(self.classifier.bias)
        else:
            d = config.width
            self.feature_norm = nn.BatchNorm2d(C, affine=False, eps=1e-6) if config.feature_norm else nn.Identity()
            self.embed = nn.Linear(C, d)
            self.blocks = nn.Sequential(*(layers.TransformerBlock(d, heads=config.heads, dropout=config.dropout)
                                          for _ in range(DECODERS[config.decoder])))
            self.norm = nn.LayerNorm(d, eps=1e-6)
            self.dropout = nn.Dropout(config.dropout)
            self.classifier = nn.Linear(d, K)
            layers.init_vit(nn.ModuleList([self.embed, self.blocks, self.classifier]))
        if config.frozen:
            encoder.freeze()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The encoder's final map (B, C, h, w) of images x in [0, 1]; without autograd when frozen."""
        x = self.pixels(x)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.config.frozen):
            fmap, _ = self.encoder(x)
        return fmap

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fmap = self.features(x)
        if self.config.decoder == "lin":
            return self.classifier(self.norm(fmap.mean((2, 3))))
        tokens = self.blocks(self.embed(self.feature_norm(fmap).flatten(2).transpose(1, 2)))
        return self.classifier(self.dropout(self.norm(tokens).mean(1)))
