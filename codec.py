"""FINOLA as an image codec: an image is stored as its embedding q (§2, Fig. 1) and rebuilt by the model's FINOLA
expansion and upsampler; and its rate-distortion against JPEG at matched byte sizes.

A ``.q`` file is a safetensors file holding ``q`` (C,) in float16 (2C bytes of payload) and the metadata
  format   -- ``Q_FORMAT``, a version tag of ours
  model    -- ``model_identity`` of the model that encoded it: the decoder must be exactly that model
  weights  -- the weights file it was encoded with (named in the error when another model tries to decode it)
  channels -- C
The model is the codec's shared dictionary; a .q file is meaningless to any other model, so ``load_q`` refuses it.
"""
from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from rich.table import Table
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from analysis import batches, images_of, psnr, save_figure
from data import DECODE_ERRORS, decode as decode_image
from weights import atomic_path, one_line

Q_FORMAT = "finola-q/1"


# ---------------------------------------------------------------------------------------------------------------------
# The .q file
# ---------------------------------------------------------------------------------------------------------------------

def model_identity(model) -> str:
    """sha256 over the model's architecture record (``model.metadata["model"]``, set by weights.load_model) and
    every tensor of its state dict (name, dtype, shape, raw bytes), in name order: equal exactly when the weights
    and architecture are. Independent of the device; one pass over the weights (its time: EXPERIMENTS.md, Speed)."""
    h = hashlib.sha256(json.dumps(getattr(model, "metadata", {}).get("model"), sort_keys=True).encode())
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def q_bytes(q: torch.Tensor, *, identity: str, weights: str = "") -> bytes:
    """The bytes of a .q file for one embedding q (C,): float16 tensor ``q`` plus our metadata."""
    if q.dim() != 1:
        raise ValueError(f"q: expected one embedding (C,), got {tuple(q.shape)}")
    q16 = q.detach().cpu().half()
    if not torch.isfinite(q16).all():
        raise ValueError(f"q: values beyond float16's range (|q| max {q.abs().max().item():.4g}); cannot store it")
    meta = {"format": Q_FORMAT, "model": identity, "weights": str(weights), "channels": str(len(q16))}
    return safetensors_bytes({"q": q16.contiguous()}, metadata=meta)


def save_q(path, q: torch.Tensor, *, identity: str, weights: str = "") -> Path:
    """Write the .q file of embedding q (C,) made by the model with ``identity`` (``model_identity``), atomically
    (a temporary name in the same folder, then a rename)."""
    path = Path(path)
    payload = q_bytes(q, identity=identity, weights=weights)
    with atomic_path(path) as tmp:
        tmp.write_bytes(payload)
    return path


def read_q(path) -> tuple[torch.Tensor, dict]:
    """``(q, metadata)`` of a .q file, checked to be ours and well formed (one finite float16 vector of the length
    its metadata states); a one-line error naming the file otherwise (junk, truncated, another format)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"q file: no such file {str(path)!r}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta, q = f.metadata() or {}, (f.get_tensor("q") if "q" in f.keys() else None)
    except Exception as e:  # safetensors raises its own error types for other files, and for truncated ones
        raise ValueError(f"q file: {str(path)!r} is not a safetensors file, or is truncated ({one_line(e)})") from e
    if meta.get("format") != Q_FORMAT or q is None:
        raise ValueError(f"q file: {str(path)!r} is not a FINOLA .q file (metadata 'format' is "
                         f"{meta.get('format')!r}, expected {Q_FORMAT!r})")
    if q.dim() != 1 or q.dtype != torch.float16 or str(len(q)) != meta.get("channels") or not torch.isfinite(q).all():
        raise ValueError(f"q file: {str(path)!r} is damaged: expected one finite float16 vector of the "
                         f"{meta.get('channels')!r} channels its metadata states, got {q.dtype} {tuple(q.shape)}"
                         f"{'' if torch.isfinite(q).all() else ' with non-finite values'}")
    return q, meta


def load_q(path, *, identity: str) -> torch.Tensor:
    """The float16 embedding q (C,) of a .q file; a clear error when the file is not ours (``read_q``) or was
    encoded by a model other than the one with ``identity``."""
    q, meta = read_q(path)
    if meta.get("model") != identity:
        raise ValueError(f"q file: {str(path)!r} was encoded by a different model (weights "
                         f"{meta.get('weights') or '?'!r}, identity {meta.get('model', '?')[:12]}...) than --weights "
                         f"(identity {identity[:12]}...); decode it with the weights that encoded it")
    return q


def read_image(path) -> Image.Image:
    """The RGB image in ``path`` (any format Pillow reads); a one-line error naming the file when it is missing or
    not an image (text, truncated, a decompression bomb)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"image: no such file {str(path)!r}")
    try:
        return decode_image(str(path))
    except DECODE_ERRORS as e:
        raise ValueError(f"image: {str(path)!r} is not an image Pillow can read ({type(e).__name__}: "
                         f"{one_line(e)})") from e


@torch.no_grad()
def encode(model, x: torch.Tensor) -> torch.Tensor:
    """The float16 embeddings q (B, C) that the codec stores for images x (B, 3, H, W) in [0, 1]."""
    return model.eval().encode(x).half()


@torch.no_grad()
def decode(model, q: torch.Tensor) -> torch.Tensor:
    """The images (B, 3, H, W) in [0, 1] rebuilt from stored embeddings q (B, C)."""
    return images_of(model.eval(), q.float())


# ---------------------------------------------------------------------------------------------------------------------
# 8-bit q
# ---------------------------------------------------------------------------------------------------------------------

def quantize8(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-vector min/max affine 8-bit quantisation of q (B, C): ``(codes uint8 (B, C), offset, scale)``, offset
    and scale (B, 1) in float16, so C + 4 bytes a vector. offset is the minimum rounded down to float16, scale
    (max - offset) / 255 rounded up, codes = round((q - offset) / scale): every element comes back within scale / 2.
    """
    q = q.float()
    lo = q.amin(1, keepdim=True)
    offset = (lo - lo.abs() * 2 ** -10).half()  # float16's relative rounding error is at most 2^-11
    scale = ((q.amax(1, keepdim=True) - offset.float()) / 255 * (1 + 2 ** -10)).half()
    codes = ((q - offset.float()) / scale.float().clamp_min(1e-30)).round().clamp(0, 255).to(torch.uint8)
    return codes, offset, scale


def dequantize8(codes: torch.Tensor, offset: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """q (B, C) in float32 from ``quantize8``'s output."""
    return offset.float() + codes.float() * scale.float()


# ---------------------------------------------------------------------------------------------------------------------
# JPEG (Pillow, optimised Huffman tables, default 4:2:0 chroma subsampling) at every quality
# ---------------------------------------------------------------------------------------------------------------------

def scan_bytes(jpeg: bytes) -> int:
    """Bytes of a baseline JPEG's entropy-coded scan: the file less its headers and quantisation / Huffman tables
    (what a decoder that knew the tables in advance, as ours knows its model, would still need)."""
    i = 2  # after SOI
    while i + 4 <= len(jpeg) and jpeg[i] == 0xFF:
        length = int.from_bytes(jpeg[i + 2:i + 4], "big")
        if jpeg[i + 1] == 0xDA:  # start of scan: the rest, up to the 2-byte end-of-image marker, is the scan
            return len(jpeg) - (i + 2 + length) - 2
        i += 2 + length
    raise ValueError("jpeg: no start-of-scan marker found")


def to_pil(x: torch.Tensor) -> Image.Image:
    """An 8-bit RGB PIL image of x (3, H, W) in [0, 1]."""
    return Image.fromarray((x.detach().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8))


def jpeg_sweep(x: torch.Tensor, qualities) -> dict[str, torch.Tensor]:
    """JPEG of one image x (3, H, W) in [0, 1] (rounded to 8 bits) at each quality: ``file_bytes``, ``scan_bytes``
    and ``psnr_db`` (of the decoded JPEG against x itself), each (len(qualities),)."""
    pil = to_pil(x)
    files, decoded = [], []
    for quality in qualities:
        buf = io.BytesIO()
        pil.save(buf, "JPEG", quality=int(quality), optimize=True)
        files.append(buf.getvalue())
        decoded.append(torch.from_numpy(np.array(Image.open(buf).convert("RGB"))).permute(2, 0, 1))
    y = torch.stack(decoded).float() / 255
    return {"file_bytes": torch.tensor([len(f) for f in files], dtype=torch.float64),
            "scan_bytes": torch.tensor([scan_bytes(f) for f in files], dtype=torch.float64),
            "psnr_db": psnr(x.cpu().float().expand_as(y), y).double()}


# ---------------------------------------------------------------------------------------------------------------------
# Rate-distortion
# ---------------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def rate_distortion(model, loader, *, limit: int | None = None, qualities=range(1, 96)) -> dict:
    """Bytes per image and mean per-image PSNR on ``loader``'s images for q in float16 (2C bytes) and 8-bit
    (``quantize8``, C + 4 bytes), next to JPEG matched per image to the same byte count: the quality whose size is
    closest, counting the whole file (``jpeg_file_*``) or its scan alone (``jpeg_scan_*``, a lower bound for
    JPEG that leaves out its tables as q leaves out the model). Also q in float32 and the .q file's size with its
    metadata, and JPEG's mean curve over ``qualities`` (``curve_*``)."""
    model.eval()
    qualities = list(qualities)
    scores = {"fp32": [], "fp16": [], "q8": []}
    sweeps = []
    for x in batches(loader, limit=limit, description="rate-distortion"):
        q = model.encode(x).float()
        scores["fp32"].append(psnr(x, images_of(model, q)))
        scores["fp16"].append(psnr(x, decode(model, q.half())))
        scores["q8"].append(psnr(x, images_of(model, dequantize8(*quantize8(q)))))
        sweeps += [jpeg_sweep(image, qualities) for image in x]
    jpeg = {k: torch.stack([s[k] for s in sweeps]) for k in sweeps[0]}  # (N, len(qualities)) each
    C = q.shape[1]
    result = {"images": len(jpeg["psnr_db"]), "channels": C,
              "q_fp32_psnr_db": torch.cat(scores["fp32"]).mean().item(),
              "q_fp16_bytes": 2 * C, "q_fp16_psnr_db": torch.cat(scores["fp16"]).mean().item(),
              "q_file_bytes": len(q_bytes(q[0], identity=model_identity(model))),
              "q8_bytes": C + 4, "q8_psnr_db": torch.cat(scores["q8"]).mean().item()}
    rows = torch.arange(result["images"])
    for target in ("q_fp16", "q8"):
        for measure in ("file", "scan"):
            pick = (jpeg[f"{measure}_bytes"] - result[f"{target}_bytes"]).abs().argmin(1)  # closest size per image
            key = f"jpeg_{measure}_at_{target}"
            result[f"{key}_bytes"] = jpeg[f"{measure}_bytes"][rows, pick].mean().item()
            result[f"{key}_psnr_db"] = jpeg["psnr_db"][rows, pick].mean().item()
            result[f"{key}_quality"] = torch.tensor(qualities, dtype=torch.float64)[pick].mean().item()
    result |= {"curve_quality": qualities, "curve_file_bytes": jpeg["file_bytes"].mean(0).tolist(),
               "curve_scan_bytes": jpeg["scan_bytes"].mean(0).tolist(),
               "curve_psnr_db": jpeg["psnr_db"].mean(0).tolist()}
    return result


def rate_distortion_table(result: dict, *, title: str) -> Table:
    """The rate-distortion comparison as a rich table."""
    table = Table(title=title)
    for name in ("method", "bytes / image", "PSNR", "JPEG quality (mean)"):
        table.add_column(name, justify="left" if name == "method" else "right")
    table.add_row("FINOLA q, float32 (reference)", f"{4 * result['channels']}",
                  f"{result['q_fp32_psnr_db']:.2f} dB", "")
    table.add_row("FINOLA q, float16", f"{result['q_fp16_bytes']} ({result['q_file_bytes']} as a .q file)",
                  f"{result['q_fp16_psnr_db']:.2f} dB", "")
    table.add_row("FINOLA q, 8-bit", f"{result['q8_bytes']}", f"{result['q8_psnr_db']:.2f} dB", "")
    for target, name in (("q_fp16", "float16 q"), ("q8", "8-bit q")):
        for measure, what in (("file", "whole file"), ("scan", "scan only")):
            key = f"jpeg_{measure}_at_{target}"
            table.add_row(f"JPEG, {what}, matched to {name}", f"{result[f'{key}_bytes']:.0f}",
                          f"{result[f'{key}_psnr_db']:.2f} dB", f"{result[f'{key}_quality']:.1f}")
    return table


def plot_rate_distortion(result: dict, path) -> Path:
    """PSNR against bytes per image: JPEG's curve (whole file and scan only) with FINOLA's q as points."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 4.5))
    ax = fig.subplots()
    ax.plot(result["curve_file_bytes"], result["curve_psnr_db"], label="JPEG, whole file (quality 1-95)")
    ax.plot(result["curve_scan_bytes"], result["curve_psnr_db"], "--", label="JPEG, scan only")
    for key, name, marker in (("q_fp16", "FINOLA q, float16", "o"), ("q8", "FINOLA q, 8-bit", "s")):
        ax.plot(result[f"{key}_bytes"], result[f"{key}_psnr_db"], marker, ms=8, label=name)
    ax.set(xscale="log", xlabel="bytes per image", ylabel="PSNR (dB)",
           title=f"rate-distortion on {result['images']} images, C = {result['channels']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)
