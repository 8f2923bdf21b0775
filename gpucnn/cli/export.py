"""``gpucnn export``: a checkpoint's model as an ONNX file (gpucnn.export), for ONNX Runtime and other runtimes."""
from __future__ import annotations

import json
from pathlib import Path

import click

from gpucnn.checkpoint import load_checkpoint, model_from_checkpoint
from gpucnn.cli import data as cli_data


@click.command(name="export")
@click.argument("checkpoint", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--raw-pixels", is_flag=True,
              help="Put the checkpoint's input normalisation into the graph, so the file takes raw pixels "
                   "(floats 0-255). [default: it takes normalised pixels, as gpucnn's model does]")
def export(checkpoint, out, raw_pixels):
    """Write a checkpoint's model as an ONNX file (opset 17) that ONNX Runtime runs.

    The graph takes float32 images (N, C, H, W), any N, and gives logits
    (N, classes). Its metadata holds the class names, the data set and the
    normalisation statistics. Needs the onnx package: pip install 'gpucnn[onnx]'.

    \b
    Examples:
      gpucnn export runs/fm/checkpoint.npz runs/fm/model.onnx
      gpucnn export runs/fm/best.npz runs/fm/model-raw.onnx --raw-pixels
    """
    from gpucnn.export import to_onnx  # noqa: PLC0415 - keeps onnx out of the other commands' imports
    if out.suffix != ".onnx":
        raise ValueError(f"OUT must name a .onnx file, not {out}.")
    ckpt = load_checkpoint(checkpoint)
    model = model_from_checkpoint(ckpt, "cpu")
    settings = cli_data.checkpoint_settings(ckpt, checkpoint)
    metadata = {"dataset": settings.dataset, "classes": json.dumps(list(settings.classes)),
                "mean": json.dumps(list(settings.mean)), "std": json.dumps(list(settings.std)),
                "input": "raw pixels 0-255" if raw_pixels else "normalised pixels: (pixels / 255 - mean) / std"}
    to_onnx(model, out, normalization=(settings.mean, settings.std) if raw_pixels else None, metadata=metadata)
    C, H, W = model.input_shape
    source = "raw pixels 0-255, normalised in the graph" if raw_pixels else \
        "normalised pixels, (pixels / 255 - mean) / std with the checkpoint's statistics"
    click.echo(f"wrote {out}: {model.config.get('name', type(model).__name__)}, input (N, {C}, {H}, {W}) "
               f"float32 {source}; output logits (N, {len(settings.classes)}); ONNX opset 17")
