"""gpucnn's command line: ``gpucnn train | evaluate | predict | summary | visualize | features | export``.

One module per command group: train (gpucnn.cli.train), evaluate and predict
(gpucnn.cli.inference), summary (gpucnn.cli.summary), visualize and features
(gpucnn.cli.viz), export (gpucnn.cli.export); the Click app itself and ``main`` live in gpucnn.cli.app, shared
options in gpucnn.cli.options, the data settings in gpucnn.cli.data and the
expected errors in gpucnn.cli.errors.

Every expected failure (no GPU, missing data, a bad checkpoint, an invalid
value, an unwritable folder) ends with one line on stderr and exit status 1;
Click usage errors (an unknown option, a value out of range) exit with 2, also
on one line. An interrupted ``train`` saves a checkpoint and exits with 130 (Ctrl-C) or 143 (SIGTERM).
"""
from gpucnn.cli import export, inference, summary, train, viz
from gpucnn.cli.app import cli, main

for _command in (train.train, inference.evaluate_command, inference.predict, summary.summary, viz.visualize,
                 viz.features, export.export):
    cli.add_command(_command)

__all__ = ["cli", "main"]
