"""``gpucnn summary``: a model's layers, parameters and receptive fields."""
from __future__ import annotations

import click

from gpucnn.cli.options import model_option
from gpucnn.models import build_model


def _pair_text(pair) -> str:
    if pair is None:
        return "-"
    return str(pair[0]) if pair[0] == pair[1] else f"{pair[0]}x{pair[1]}"


COVER_SIZE = 300   # the lecture's example: how deep until one neuron sees a whole 300x300 image


def _input_shape(value):
    """``"3,32,32"`` -> (3, 32, 32); None stays None."""
    if value is None:
        return None
    try:
        shape = tuple(int(part) for part in value.replace("x", ",").split(","))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise click.BadParameter(f"{value!r} is not C,H,W (three positive ints, e.g. 3,32,32).")
    return shape


@click.command()
@model_option
@click.option("--input-shape", callback=lambda ctx, param, value: _input_shape(value), default=None,
              metavar="C,H,W", help="The input to describe the model for, e.g. 3,32,32. [default: the model's own]")
def summary(model, input_shape):
    """Print the layers, parameters and receptive fields of a model.

    Per layer: output shape, parameters ((KW*KH*Cin+1)*Cout for a convolution,
    (IN+1)*OUT for a linear layer), receptive field (rf) and jump; then the total,
    and how many stacked 3x3 layers one neuron needs to see a whole 300x300 image.

    rf is how many input pixels (per axis) one output sees; jump is the distance in
    input pixels between neighbouring outputs. From flatten on, every output sees
    the whole image ("-"). A residual block lists its body's layers, its shortcut's,
    then its own row (the sum), whose field is the larger of the two paths'.

    \b
    Examples:
      gpucnn summary --model vgg-small --input-shape 3,32,32
      gpucnn summary --model lenet5 --input-shape 3,32,32
      gpucnn summary --model resnet20 --input-shape 1,28,28
    """
    from gpucnn.models import default_input_shape  # noqa: PLC0415
    from gpucnn.receptive import layer_geometry, stacked_3x3_layers, window_strides  # noqa: PLC0415
    C, H, W = input_shape or default_input_shape(model)
    if H != W:
        raise ValueError(f"--input-shape {C},{H},{W}: gpucnn's models take square images (H = W).")
    network = build_model(model, in_channels=C, input_size=H)
    rows = layer_geometry(network, tuple(network.input_shape))
    name_width = max(8, *(len(row.name) for row in rows))
    type_width = max(10, *(len(row.type) for row in rows))
    header = (f"{'layer':<{name_width}} {'type':<{type_width}} {'output shape':<16} {'params':>9} {'rf':>4} "
              f"{'jump':>5}")
    rule = "-" * len(header)
    click.echo(f"{model} for input {tuple(network.input_shape)}")
    click.echo(header)
    click.echo(rule)
    for row in rows:
        shape = "(" + ", ".join(str(d) for d in row.output_shape) + ")"
        click.echo(f"{row.name:<{name_width}} {row.type:<{type_width}} {shape:<16} {row.num_params:>9,} "
                   f"{_pair_text(row.rf):>4} {_pair_text(row.jump):>5}")
    click.echo(rule)
    total = sum(row.num_params for row in rows)
    spatial = [row for row in rows if row.spatial]
    click.echo(f"total parameters: {total:,}")
    if spatial:
        click.echo(f"largest receptive field: {_pair_text(spatial[-1].rf)} pixels ({spatial[-1].name})")
    strides = window_strides(rows)
    plain = stacked_3x3_layers(COVER_SIZE)
    strided = stacked_3x3_layers(COVER_SIZE, strides)
    click.echo(f"{COVER_SIZE}x{COVER_SIZE} input: one neuron sees all of it after {plain} stacked 3x3 stride-1 "
               f"layers (N layers see 2N+1 pixels), or after {strided} 3x3 layers with this model's strides "
               f"({', '.join(map(str, strides))}, then 1)")
