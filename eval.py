"""Metrics and evaluations of our checkpoints: ``python eval.py COMMAND --weights FILE ...``.

Each command loads and checks its weights and its data once (``--data``, default the weights' training data), prints
a table, writes its figures to ``--out`` (default: the weights' folder) and ends with one JSON line of its figures.

The evaluations (``metrics.py``'s, run at the end of training too): ``reconstruct`` (PSNR next to mean colour,
bilinear and PCA with k = q's numbers, and a PNG; §4, Table 2), ``detect`` (COCO AP, and a PNG of boxes; Tables 4,
18), ``masked`` (masked-region PSNR from the centred block; §3), ``mae`` (MAE's loss on a fixed draw of removed
patches, next to each patch's mean colour; Table 6), ``classify`` (top-1 / top-5; Tables 1, 3). The analyses:
``curvature`` (Gaussian curvature of the maps' critical channels, checkpoints overlaid; Eq. 9, Fig. 5),
``embedding`` (the space of q; App. E.2), ``pde`` (Eq. 2's residuals, Eq. 4, the one-way waves; App. A),
``readout`` (the image read linearly out of every stage, next to the PCA of q's size and each layout's; readout.py). The codec
(``codec.py``): ``encode`` / ``decode`` (an image to a .q file and back to a PNG), ``rate-distortion`` (q, float16
and 8-bit, against JPEG at matched sizes). ``curves``: loss, lr, img/s and final metrics of runs against step.
``export``: a hub-ready folder, model.safetensors and a model card. --weights / --init also take hf:ORG/REPO[/FILE].
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
from rich.console import Console
from rich.markup import escape
from rich.table import Table

import analysis
import codec
import data
import metrics
import readout
import runs
import weights
from analysis import psnr
from tasks import TASKS

console = Console(stderr=True)


# ---------------------------------------------------------------------------------------------------------------------
# Commands. Each has one shape: load and check its weights once (``load_checked``), load its data once (``_loader``),
# compute with the functions above, print a table, write its figures to --out (default: the (first) weights' folder)
# and return the figures that ``main`` prints as the one JSON line.
# ---------------------------------------------------------------------------------------------------------------------

ANALYSES = {"curvature": ("finola", "masked-e", "masked-b"), "embedding": ("finola",), "pde": ("finola",),
            "readout": ("finola",),
            "encode": ("finola",), "decode": ("finola",), "rate-distortion": ("finola",)}  # command -> archs read


def reads(command: str) -> tuple[str, ...]:
    """The architectures ``command`` reads: an evaluation's (``metrics.EVALUATIONS``) or an analysis' (``ANALYSES``)."""
    return metrics.EVALUATIONS[command].reads if command in metrics.EVALUATIONS else ANALYSES[command]


def written_by(archs) -> list[str]:
    """The train.py tasks whose final evaluation reads one of ``archs`` (so whose weights have that arch)."""
    return [name for name, task in TASKS.items() if set(metrics.EVALUATIONS[task.evaluation].reads) & set(archs)]


def load_checked(path, command: str):
    """The model of ``path``, which must be of an architecture that ``command`` reads."""
    model = weights.load_model(path)
    arch, archs = model.metadata["model"]["arch"], reads(command)
    if arch not in archs:
        raise ValueError(f"--weights: {path} holds a {arch!r} model; {command} needs a "
                         f"{' or '.join(map(repr, archs))} model (train.py --task {' or '.join(written_by(archs))})")
    return model


def training_flags(meta: dict) -> dict:
    """The flags of the run that wrote a weights file, its training data under "data" (files name it twice)."""
    train = dict(meta.get("train", {}))
    train["data"] = meta.get("data") or train.get("data")
    if not train["data"]:
        raise ValueError("--data: the weights' metadata names no training data; pass --data SOURCE")
    return train


def _loader(args, model, command: str = "reconstruct", *, data_of=None):
    """The images of ``command``'s evaluation for ``model``: --data (default: the training data of ``data_of``'s
    weights, else ``model``'s) [--split], prepared as in training; unreadable images counted in ``args.bad``."""
    train = training_flags((data_of or model).metadata)
    source, options = (args.data, {}) if args.data else (train["data"], train.get("data_options", {}))
    return metrics.evaluation_loader(command, model, source=source, split=args.split, options=options, train=train,
                                     batch_size=args.batch_size, image_size=getattr(args, "image_size", None),
                                     bad=args.bad)


def _out(args, name: str = "") -> Path:
    """Where a command writes the figure ``name`` (none: the folder itself): --out, or the (first) --weights file's
    folder."""
    first = args.weights[0] if isinstance(args.weights, list) else args.weights
    folder = args.out or (Path(".") if str(first).startswith(weights.HUB) else Path(first).parent)
    return Path(folder) / name


def _row(title: str, row: dict) -> None:
    """A command's figures as one row under their names."""
    table = Table(title=escape(title))
    for name in row:
        table.add_column(name, justify="right")
    table.add_row(*row.values())
    console.print(table)


def _figures(title: str, result: dict) -> None:
    """A command's many figures as a two-column table (numbers to 4 significant digits)."""
    table = Table(title=escape(title))
    table.add_column("figure")
    table.add_column("value", justify="right")
    for k, v in result.items():
        values = v if isinstance(v, list) else [v]
        table.add_row(k, ", ".join(f"{x:.4g}" if isinstance(x, float) else str(x) for x in values))
    console.print(table)


def _evaluate(args, command: str, **flags) -> tuple:
    """``metrics.evaluate`` of the --weights file as its run would, on --data [--split]: (model, loader, figures);
    ``flags`` override the run's (e.g. pca_images)."""
    model = load_checked(args.weights, command)
    loader = _loader(args, model, command)
    out = _out(args)
    result = metrics.evaluate(command, model, loader, out=out, train=training_flags(model.metadata) | flags,
                              bad=args.bad)
    figure = metrics.figure_path(command, out)
    return model, loader, result | ({"figure": str(figure)} if figure is not None else {})


def cmd_reconstruct(args) -> dict:
    if args.pca_images < 0:
        raise ValueError(f"--pca-images: expected 0 (no PCA baseline) or a number of crops, got {args.pca_images}")
    model, loader, result = _evaluate(args, "reconstruct", pca_images=args.pca_images)
    names = {"psnr_db": "model", "psnr_layer_norm_db": "model, per-position norm", "mean_colour_db": "mean colour",
             "bilinear_db": f"bilinear via {model.config.grid[0]}x{model.config.grid[1]}",
             "pca_db": f"PCA, k = {model.latent}"}
    _row(f"Reconstruction PSNR on {loader.source} [{args.split}], {result['images']} images",
         {names[k]: "-" if result[k] is None else f"{result[k]:.2f} dB" for k in names if k in result})
    return result


def cmd_detect(args) -> dict:
    model, loader, result = _evaluate(args, "detect")
    size = loader.transform.size
    _row(f"COCO box AP on {loader.source} [{args.split}], {result['images']} images at {size}x{size}",
         {k: f"{100 * result[k]:.1f}" if result[k] >= 0 else "-" for k in metrics.AP_NAMES})  # -1: no such boxes
    return result


def cmd_masked(args) -> dict:
    model, loader, result = _evaluate(args, "masked")
    _row(f"Masked-region PSNR on {loader.source} [{args.split}], {result['images']} images, centred block "
         f"(figure: originals, visible blocks, predictions)",
         {model.metadata["model"]["arch"]: f"{result['masked_psnr_db']:.2f} dB",
          "block's mean colour": f"{result['block_colour_db']:.2f} dB"})
    return result


def cmd_mae(args) -> dict:
    model, loader, result = _evaluate(args, "mae")
    _row(f"MAE's loss on the removed patches of {loader.source} [{args.split}], {result['images']} images (figure: "
         f"originals, visible patches, predictions)", {"model": f"{result['mae_loss']:.4f}",
                                                        "each patch's mean colour": f"{result['patch_mean_loss']:.4f}"})
    return result


def cmd_classify(args) -> dict:
    model, loader, result = _evaluate(args, "classify")
    size = loader.transform.size
    _row(f"Classification on {loader.source} [{args.split}], {result['images']} images at {size}x{size}, "
         f"{model.config.decoder} decoder", {k: f"{100 * result[k]:.2f}%" for k in ("top1", "top5") if k in result})
    return result


def cmd_curvature(args) -> dict:
    models = [load_checked(w, "curvature") for w in args.weights]
    labels = args.labels or [Path(w).parent.name or Path(w).stem for w in args.weights]
    if len(labels) != len(models) or len(set(labels)) != len(labels):
        raise ValueError(f"--labels: expected {len(models)} distinct labels, one per --weights file, got {labels}")
    loaders = [_loader(args, m, data_of=models[0]) for m in models]  # the same images for every checkpoint
    stats = {label: analysis.curvature_stats(m, loader, top=args.top, limit=args.max_images)
             for label, m, loader in zip(labels, models, loaders)}
    figure = analysis.plot_curvature(stats, _out(args, "curvature.png"))
    result = {label: analysis.curvature_summary(s) for label, s in stats.items()}
    for label, summary in result.items():
        _figures(f"Gaussian curvature of {label}'s top channels on {loaders[0].source} [{args.split}]", summary)
    return {"checkpoints": result, "figure": str(figure)}


def _study(args, command: str, study, title: str) -> dict:
    """An ``analysis`` study of one checkpoint over its data, reported; ``title`` may use {source}."""
    model = load_checked(args.weights, command)
    loader = _loader(args, model)
    result = study(model, loader, limit=args.max_images, out=_out(args))
    _figures(f"{title.format(source=loader.source)} [{args.split}]", result)
    return result


def cmd_embedding(args) -> dict:
    return _study(args, "embedding", analysis.embedding_study, "Embedding space on {source}")


def cmd_pde(args) -> dict:
    return _study(args, "pde", analysis.pde_study, "Eq. 2 and Eq. 4 on the maps of {source} (relative residuals: "
                                                   "0 = exact)")


@torch.no_grad()
def cmd_readout(args) -> dict:
    model = load_checked(args.weights, "readout").eval()
    analysis.check_pca_size(3 * model.image_size[0] * model.image_size[1], model.latent)
    x_val = torch.cat([b["images"] for b in _loader(args, model)])[: args.max_images]
    if not len(x_val):
        raise ValueError("readout: the evaluation data gave no images")
    train = training_flags(model.metadata)
    crops = list(metrics.training_crops(model, train["data"], train.get("data_options", {}), n=args.train_images,
                                        bad=args.bad))
    stages = readout.readout(model, crops, x_val)
    pca = analysis.fit_pca(crops, model.latent)
    result = {"images": len(x_val), "train_images": sum(map(len, crops)),
              "model_db": round(psnr(x_val, model(x_val)).mean().item(), 3), "pca_k": model.latent,
              "pca_db": round(psnr(x_val, analysis.pca_reconstruct_images(x_val, pca)).mean().item(), 3),
              "stages": stages}
    table = Table(title=escape(f"Linear read-out of each stage: {result['images']} images [{args.split}], ridge "
                               f"fitted on {result['train_images']} training crops; the model {result['model_db']:.2f} "
                               f"dB, PCA (k = {model.latent}) on the same crops {result['pca_db']:.2f} dB"))
    for col in ("stage", "numbers", "read-out PSNR", "vs PCA", "its layout, linearly"):
        table.add_column(col, justify="right")
    for row in stages:
        db, twin = row["psnr_db"], row["layout_pca_db"]
        table.add_row(row["stage"], str(row["numbers"]), "skipped (too many numbers)" if db is None else f"{db:.2f} dB",
                      "" if db is None else f"{db - result['pca_db']:+.2f} dB",
                      "lossless" if row["layout_lossless"] else "" if twin is None else f"{twin:.2f} dB")
    console.print(table)
    return result


def cmd_rate_distortion(args) -> dict:
    model = load_checked(args.weights, "rate-distortion")
    loader = _loader(args, model)
    result = codec.rate_distortion(model, loader, limit=args.max_images)
    title = f"Rate-distortion on {loader.source} [{args.split}], {result['images']} images"
    console.print(codec.rate_distortion_table(result, title=escape(title)))
    result["figure"] = str(codec.plot_rate_distortion(result, _out(args, "rate_distortion.png")))
    return result


def cmd_encode(args) -> dict:
    image = codec.read_image(args.image)  # a missing or non-image file fails before the model loads
    model = load_checked(args.weights, "encode")
    x = metrics.whole(model, {})(image)[None]
    q = codec.encode(model, x)
    path = codec.save_q(args.output or Path(f"{args.image}.q"), q[0], identity=codec.model_identity(model),
                        weights=args.weights)
    result = {"q_file": str(path), "file_bytes": path.stat().st_size, "payload_bytes": 2 * q.shape[1],
              "psnr_db": psnr(x, codec.decode(model, q)).item()}
    _figures(f"{args.image} encoded", result)
    return result


def cmd_decode(args) -> dict:
    model = load_checked(args.weights, "decode")
    q = codec.load_q(args.qfile, identity=codec.model_identity(model))
    path = args.output or args.qfile.with_suffix(".png")
    analysis.save_image(codec.to_pil(codec.decode(model, q[None])[0]), path)
    result = {"image": str(path), "size": list(model.image_size)}
    _figures(f"{args.qfile} decoded", result)
    return result


def cmd_curves(args) -> dict:
    return runs.compare(args.runs, labels=args.labels, out=args.out and args.out / "curves.png", console=console)


def cmd_export(args) -> dict:
    out = weights.export(args.weights, args.out)
    console.print(f"{out}: model.safetensors + README.md; upload: huggingface-cli upload ORG/REPO {escape(str(out))}")
    return {"folder": str(out), "files": ["model.safetensors", "README.md"]}


COMMANDS = {"reconstruct": cmd_reconstruct, "detect": cmd_detect, "masked": cmd_masked, "mae": cmd_mae,
            "classify": cmd_classify,
            "curvature": cmd_curvature, "embedding": cmd_embedding, "pde": cmd_pde, "readout": cmd_readout,
            "rate-distortion": cmd_rate_distortion, "encode": cmd_encode, "decode": cmd_decode, "curves": cmd_curves,
            "export": cmd_export}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    one = argparse.ArgumentParser(add_help=False)  # one --weights file
    one.add_argument("--weights", required=True, help="a model.safetensors of ours (or hf:ORG/REPO[/FILE])")
    evaluated = argparse.ArgumentParser(add_help=False)  # the data and figures of every evaluation
    evaluated.add_argument("--data", help="source (default: the data the (first) weights were trained on)")
    evaluated.add_argument("--split", default="validation")
    evaluated.add_argument("--batch-size", type=int, default=32)
    evaluated.add_argument("--out", type=Path, help="folder for the PNG figures (default: the (first) weights' folder)")
    analysed = argparse.ArgumentParser(add_help=False)
    analysed.add_argument("--max-images", type=int, help="use at most this many images (default: all)")
    sized = argparse.ArgumentParser(add_help=False)
    sized.add_argument("--image-size", type=int, help="network input side (default: the training image size)")
    r = sub.add_parser("reconstruct", parents=[one, evaluated], help="PSNR of a FINOLA model against baselines, and a "
                                                                    "PNG of originals above reconstructions")
    r.add_argument("--pca-images", type=int, default=20000,
                   help="training crops for the PCA baseline with k = q's numbers (M C) components (0 skips it)")
    sub.add_parser("detect", parents=[one, evaluated, sized], help="COCO AP of a DETR model, and a PNG of true (green) "
                                                                 "and predicted (red) boxes")
    sub.add_parser("masked", parents=[one, evaluated], help="masked-region PSNR of a masked FINOLA model (centred "
                                                           "block), and a PNG")
    sub.add_parser("mae", parents=[one, evaluated, sized], help="MAE's loss on removed patches (fixed draw), and a PNG")
    sub.add_parser("classify", parents=[one, evaluated, sized], help="top-1 / top-5 accuracy of a classifier")
    c = sub.add_parser("curvature", parents=[evaluated, analysed], help="Gaussian curvature of critical channels "
                                                                       "(Fig. 5)")
    c.add_argument("--weights", nargs="+", required=True, help="one or more model.safetensors, overlaid")
    c.add_argument("--labels", nargs="+", help="one name per --weights file (default: their folders' names)")
    c.add_argument("--top", type=int, default=16, help="channels ranked per image (the top-K of Fig. 5)")
    for name, what in (("embedding", "the space of q (App. E.2), five PNGs"), ("pde", "Eq. 2 and Eq. 4 (App. A), and the one-way waves: speeds (speeds.json) and residuals"),
                       ("rate-distortion", "q (float16, 8-bit) against JPEG at matched bytes, table and PNG")):
        sub.add_parser(name, parents=[one, evaluated, analysed], help=what)
    ro = sub.add_parser("readout", parents=[one, evaluated, analysed],
                        help="the image read linearly out of every stage (stem, blocks, encoder map, q, FINOLA map), "
                             "next to the PCA of q's size and each map's layout coded linearly")
    ro.add_argument("--train-images", type=int, default=10000, help="training crops the read-outs are fitted on")
    e = sub.add_parser("encode", parents=[one], help="an image to a .q file (q in float16)")
    e.add_argument("image", type=Path)
    e.add_argument("-o", "--output", type=Path, help="the .q file (default: IMAGE.q)")
    de = sub.add_parser("decode", parents=[one], help="a .q file back to a PNG, by the model that encoded it")
    de.add_argument("qfile", type=Path)
    de.add_argument("-o", "--output", type=Path, help="the PNG (default: QFILE with the suffix .png)")
    cu = sub.add_parser("curves", help="loss, lr, img/s and the final metrics of runs against step (PNG, table)")
    cu.add_argument("runs", nargs="+", help="run folders of train.py (or their metrics.jsonl), overlaid")
    cu.add_argument("--labels", nargs="+", help="one name per run (default: the folders' names)")
    cu.add_argument("--out", type=Path, help="folder for curves.png (default: the first run's folder)")
    ex = sub.add_parser("export", parents=[one], help="a folder for the hub: model.safetensors and its model card")
    ex.add_argument("--out", type=Path, required=True, help="the folder to write")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    args.bad = data.BadImages()  # every loader of the command counts its unreadable images here
    result = COMMANDS[args.command](args)
    if args.bad.total():
        console.print(args.bad.summary())
    print(json.dumps({k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in result.items()}))
    return result


if __name__ == "__main__":
    import errors

    errors.run(main)
