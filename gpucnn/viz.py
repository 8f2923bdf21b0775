"""Figures: learned filters, top-activating input patches, training curves, confusion matrix (PNG via matplotlib).

matplotlib is an optional extra (``pip install 'gpucnn[viz]'``) and is imported
only when a figure is drawn. Figures are drawn on matplotlib's Agg canvas
directly, without pyplot, so no global backend is switched and nothing opens a
window. Every layout is fixed in pixels at ``DPI``, so the size of each PNG
follows from its contents (documented per function).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from gpucnn.features import TopPatches
from gpucnn.files import write_atomically
from gpucnn.metrics import METRIC_KEYS, check_records, read_metrics  # noqa: F401 - also viz.METRIC_KEYS, viz.read_metrics

DPI = 100
INSTALL_HINT = "matplotlib is needed for visualize: pip install 'gpucnn[viz]'"
OUTSIDE_COLOR = "#5b84c4"   # grey inputs: receptive-field pixels beyond the image border (zero padding)
# RGB inputs: the same pixels as a checkerboard (any single colour could be the image's own)
OUTSIDE_CHECKER = ("#ffffff", "#b4b4b4")

# filter grid layout, pixels
FILTER_LEFT, FILTER_TOP, FILTER_BOTTOM, FILTER_COLORBAR = 60, 60, 10, 80
COLOUR_FILTER_COLUMNS = 8
# patch figure layout, pixels
PATCH_LEFT, PATCH_TOP, PATCH_BOTTOM, PATCH_RIGHT, PATCH_CAPTION = 70, 70, 10, 10, 16
# training curves, pixels
CURVES_SIZE = (1000, 420)
# confusion matrix, pixels
CONFUSION_CELL, CONFUSION_LEFT, CONFUSION_TOP, CONFUSION_RIGHT, CONFUSION_BOTTOM = 44, 140, 50, 20, 140


class MissingDependencyError(RuntimeError):
    """An optional dependency (matplotlib) is not installed."""


def require_matplotlib() -> None:
    """Raise MissingDependencyError with the install command when matplotlib cannot be imported."""
    try:
        import matplotlib  # noqa: F401, PLC0415 - optional extra
    except ImportError:
        raise MissingDependencyError(INSTALL_HINT) from None


def _figure_class():
    """A factory of matplotlib Figures of a given pixel size, with the Agg canvas attached."""
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415 - optional extra
    from matplotlib.figure import Figure  # noqa: PLC0415

    def make(width_px: int, height_px: int):
        fig = Figure(figsize=(width_px / DPI, height_px / DPI), dpi=DPI)
        FigureCanvasAgg(fig)
        return fig
    return make


def _axes_at(fig, left_px, top_px, width_px, height_px):
    """Axes placed by pixel rectangle measured from the figure's top-left corner."""
    W, H = fig.get_size_inches() * DPI
    return fig.add_axes((left_px / W, 1 - (top_px + height_px) / H, width_px / W, height_px / H))


def _bare(ax) -> None:
    ax.set_xticks([])
    ax.set_yticks([])


def _save(fig, path) -> Path:
    # under a temporary name: a full disk must not leave a truncated PNG behind
    return write_atomically(path, lambda f: fig.savefig(f, dpi=DPI, format="png"), durable=False)


def _fitting_fontsize(text: str, width_px: float, largest: float) -> float:
    """The font size (points, at most ``largest``) at which ``text`` fits a line ``width_px`` wide.

    Estimated, not measured: an average character of DejaVu Sans is about 0.6 em wide.
    """
    em_px_needed = width_px * 0.95 / max(1, 0.6 * len(text))
    return min(largest, em_px_needed * 72 / DPI)


def _check_cell(cell_px) -> int:
    if isinstance(cell_px, bool) or not isinstance(cell_px, int) or cell_px < 16:
        raise ValueError(f"cell_px must be an int of at least 16 pixels, got {cell_px!r}.")
    return cell_px


# --- filters -------------------------------------------------------------------
def _check_filters(weight, what: str, shape_text: str, channels: int | None = None) -> np.ndarray:
    """``weight`` as a NumPy array, refused unless 4-d (with ``channels`` input channels) and finite float."""
    weight = np.asarray(weight)
    if weight.ndim != 4 or (channels is not None and weight.shape[1] != channels):
        raise ValueError(f"{what} must have shape {shape_text}, got shape {weight.shape}.")
    if not np.issubdtype(weight.dtype, np.floating) or not np.all(np.isfinite(weight)):
        raise ValueError("filter weights must be finite floating-point numbers.")
    return weight


def filter_grid_size(OC: int, C: int, cell_px: int = 96) -> tuple[int, int]:
    """(width, height) in pixels of ``filter_grid`` for OC filters of C input channels."""
    return (FILTER_LEFT + OC * cell_px + FILTER_COLORBAR, FILTER_TOP + C * cell_px + FILTER_BOTTOM)


def filter_grid(weight, path, title: str | None = None, cell_px: int = 96) -> Path:
    """Draw convolution filters weight (OC, C, KH, KW) as a grid: one column per filter, one row per input channel.

    A diverging colormap (blue negative, white zero, red positive), symmetric
    about zero and shared by all tiles, with a colour bar. The PNG is
    ``filter_grid_size(OC, C, cell_px)`` pixels. Returns the path written.
    """
    weight = _check_filters(weight, "filter weights", "(OC, C, KH, KW)")
    cell_px = _check_cell(cell_px)
    OC, C, KH, KW = weight.shape
    width, height = filter_grid_size(OC, C, cell_px)
    fig = _figure_class()(width, height)
    limit = float(np.abs(weight).max()) or 1.0
    gap = max(2, cell_px // 12)
    image = None
    for c in range(C):
        for oc in range(OC):
            ax = _axes_at(fig, FILTER_LEFT + oc * cell_px + gap / 2, FILTER_TOP + c * cell_px + gap / 2,
                          cell_px - gap, cell_px - gap)
            image = ax.imshow(weight[oc, c], cmap="RdBu_r", vmin=-limit, vmax=limit, interpolation="nearest")
            _bare(ax)
            if c == 0:
                ax.set_title(f"filter {oc}", fontsize=8, pad=3)
            if oc == 0 and C > 1:
                ax.set_ylabel(f"in {c}", fontsize=8)
    bar = _axes_at(fig, width - FILTER_COLORBAR + 12, FILTER_TOP, 14, C * cell_px - gap)
    fig.colorbar(image, cax=bar).ax.tick_params(labelsize=7)
    fig.suptitle(title or f"{OC} filters, {KH}x{KW}", fontsize=11, y=1 - 14 / height, va="top")
    return _save(fig, path)


def colour_filter_grid_size(OC: int, cell_px: int = 64) -> tuple[int, int]:
    """(width, height) in pixels of ``colour_filter_grid`` for OC filters."""
    columns = min(OC, COLOUR_FILTER_COLUMNS)
    rows = -(-OC // columns)
    return (FILTER_LEFT + columns * cell_px + FILTER_BOTTOM, FILTER_TOP + rows * (cell_px + PATCH_CAPTION)
            + FILTER_BOTTOM)


def colour_filter_grid(weight, path, title: str | None = None, cell_px: int = 64) -> Path:
    """Draw RGB filters weight (OC, 3, KH, KW) as colour images, COLOUR_FILTER_COLUMNS to a row.

    Each filter is shown as the colour patch it responds to most: the three
    channels' weights mapped to 0.5 + 0.5 * w / max|w| (max over all filters), so
    grey is zero, and a filter looking for red is red. The PNG is
    ``colour_filter_grid_size(OC, cell_px)`` pixels. Returns the path written.
    """
    weight = _check_filters(weight, "colour filters", "(OC, 3, KH, KW)", channels=3)
    cell_px = _check_cell(cell_px)
    OC, _, KH, KW = weight.shape
    width, height = colour_filter_grid_size(OC, cell_px)
    fig = _figure_class()(width, height)
    limit = float(np.abs(weight).max()) or 1.0
    rgb = np.clip(0.5 + 0.5 * np.moveaxis(weight, 1, -1) / limit, 0, 1)      # (OC, KH, KW, 3)
    columns = min(OC, COLOUR_FILTER_COLUMNS)
    gap = max(2, cell_px // 12)
    for oc in range(OC):
        row, column = divmod(oc, columns)
        ax = _axes_at(fig, FILTER_LEFT + column * cell_px + gap / 2,
                      FILTER_TOP + row * (cell_px + PATCH_CAPTION) + gap / 2, cell_px - gap, cell_px - gap)
        ax.imshow(rgb[oc], interpolation="nearest")
        _bare(ax)
        ax.set_xlabel(f"{oc}", fontsize=7, labelpad=1)
    fig.suptitle(title or f"{OC} filters, {KH}x{KW}", fontsize=11, y=1 - 14 / height, va="top")
    fig.text(0.5, 1 - 34 / height, "RGB weights: grey = 0, a colour = the colour the filter responds to",
             ha="center", va="top", fontsize=7.5, color="#444444")
    return _save(fig, path)


# --- top patches ---------------------------------------------------------------
def patch_figure_size(channels: int, k: int, cell_px: int = 80) -> tuple[int, int]:
    """(width, height) in pixels of ``patch_figure`` for ``channels`` rows of k patches."""
    return (PATCH_LEFT + k * cell_px + PATCH_RIGHT,
            PATCH_TOP + channels * (cell_px + PATCH_CAPTION) + PATCH_BOTTOM)


def _patch_pixels(crop, low: float, high: float):
    """A crop (C, RH, RW) with NaN padding -> what imshow draws: grey (RH, RW) masked, or RGBA (RH, RW, 4)."""
    if crop.shape[0] == 1:
        return np.ma.masked_invalid(crop[0])
    from matplotlib.colors import to_rgba  # noqa: PLC0415 - optional extra, already imported by now
    rgb = np.clip((np.moveaxis(crop, 0, -1) - low) / max(high - low, 1e-12), 0, 1)
    outside = np.isnan(rgb).any(axis=-1)
    rgba = np.concatenate([np.nan_to_num(rgb), np.ones(rgb.shape[:2] + (1,))], axis=-1)
    rows, cols = np.indices(outside.shape)
    for parity, colour in enumerate(OUTSIDE_CHECKER):
        rgba[outside & ((rows + cols) % 2 == parity)] = to_rgba(colour)
    return rgba


def _crops_to_draw(crops, pixel_stats):
    """(crops (OC, k, C, RH, RW) to draw, low, high): the intensity scale of the whole figure.

    With ``pixel_stats`` = (mean, std) the training normalisation is undone, and the
    scale is [0, 1]; without, the crops' own range (NaN padding left out).
    """
    C = crops.shape[2]
    if pixel_stats is None:
        inside = crops[np.isfinite(crops)]
        return (crops, *((float(inside.min()), float(inside.max())) if inside.size else (0.0, 1.0)))
    mean, std = (np.asarray(v, np.float32).reshape(-1) for v in pixel_stats)
    if len(mean) not in (1, C) or len(std) not in (1, C):
        raise ValueError(f"pixel_stats must hold one mean and std or one per channel ({C}).")
    return crops * std.reshape(1, 1, -1, 1, 1) + mean.reshape(1, 1, -1, 1, 1), 0.0, 1.0   # NaN padding stays NaN


def patch_figure(patches: TopPatches, path, title: str | None = None, cell_px: int = 80, max_channels=None,
                 pixel_stats=None) -> Path:
    """The lecture's figure: one row per channel, its k strongest input patches left to right.

    Each patch is the channel's receptive field in the input, drawn with
    nearest-neighbour upscaling; pixels of the field beyond the image border
    (zero padding) are drawn in blue for grey inputs, as a grey-and-white
    checkerboard for RGB ones. Under each patch: the image index and the
    activation. Grey (C=1) or RGB (C=3) inputs, one intensity scale for the
    whole figure. ``max_channels`` draws only the first channels (all when None).
    ``pixel_stats`` = (mean, std), per channel or one each, undoes the training
    normalisation, so the crops are drawn as the image's own pixels in [0, 1]
    (true colours); without it the crops' own range is stretched over the scale.
    The PNG is ``patch_figure_size(drawn channels, k, cell_px)`` pixels.
    """
    if not isinstance(patches, TopPatches):
        raise TypeError(f"patch_figure needs a TopPatches (from gpucnn.features.top_patches), "
                        f"not {type(patches).__name__}.")
    cell_px = _check_cell(cell_px)
    OC, k, C = patches.crops.shape[:3]
    if C not in (1, 3):
        raise ValueError(f"patch_figure draws grey (1 channel) or RGB (3 channel) inputs, not {C} channels.")
    if max_channels is not None:
        if isinstance(max_channels, bool) or not isinstance(max_channels, int) or max_channels < 1:
            raise ValueError(f"max_channels must be a positive int or None, not {max_channels!r}.")
        OC = min(OC, max_channels)
    crops, low, high = _crops_to_draw(patches.crops[:OC], pixel_stats)
    make = _figure_class()
    width, height = patch_figure_size(OC, k, cell_px)
    fig = make(width, height)
    gap = max(2, cell_px // 16)
    row_px = cell_px + PATCH_CAPTION
    for c in range(OC):
        for r in range(k):
            ax = _axes_at(fig, PATCH_LEFT + r * cell_px + gap / 2, PATCH_TOP + c * row_px + gap / 2,
                          cell_px - gap, cell_px - gap)
            ax.set_facecolor(OUTSIDE_COLOR)
            ax.imshow(_patch_pixels(crops[c, r], low, high), cmap="gray", vmin=low, vmax=high,
                      interpolation="nearest")
            _bare(ax)
            ax.set_xlabel(f"#{patches.image[c, r]}  {patches.values[c, r]:.2f}", fontsize=7, labelpad=1)
            if r == 0:
                ax.set_ylabel(f"ch {c}", fontsize=9, rotation=0, ha="right", va="center", labelpad=6)
    RH, RW = patches.rf
    heading = title or f"{patches.layer}: top {k} input patches per channel"
    fig.text(0.5, 1 - 10 / height, heading, ha="center", va="top", fontsize=_fitting_fontsize(heading, width, 11))
    outside = "blue" if C == 1 else "checkered"
    caption = (f"receptive field {RH}x{RW} px; under each patch: image # and activation; "
               f"{outside} = beyond the image border")
    fig.text(0.5, 1 - 32 / height, caption, ha="center", va="top", fontsize=_fitting_fontsize(caption, width, 7.5),
             color="#444444")
    return _save(fig, path)


# --- training curves -------------------------------------------------------------
def training_curves(records, path, title: str | None = None) -> Path:
    """Loss (left) and accuracy (right) per epoch, train and test lines; the PNG is CURVES_SIZE pixels.

    ``records`` is what ``read_metrics`` returns (dicts with epoch, train_loss,
    test_loss, train_acc, test_acc; accuracies as fractions).
    """
    check_records(records)
    make = _figure_class()
    from matplotlib.ticker import MaxNLocator  # noqa: PLC0415 - optional extra
    fig = make(*CURVES_SIZE)
    epochs = [r["epoch"] for r in records]
    loss_ax, acc_ax = fig.subplots(1, 2)
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.13, top=0.86, wspace=0.22)
    marker = "o" if len(records) <= 30 else None
    for ax, key, scale, label in ((loss_ax, "loss", 1.0, "loss (cross-entropy)"),
                                  (acc_ax, "acc", 100.0, "accuracy (%)")):
        ax.plot(epochs, [r[f"train_{key}"] * scale for r in records], marker=marker, label="train")
        ax.plot(epochs, [r[f"test_{key}"] * scale for r in records], marker=marker, label="test")
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    last = records[-1]
    fig.suptitle(title or f"training curves: {len(records)} epochs, final test accuracy "
                 f"{last['test_acc']:.2%}", fontsize=12)
    return _save(fig, path)



def confusion_figure_size(K: int) -> tuple[int, int]:
    """(width, height) in pixels of the confusion figure of K classes."""
    grid = K * CONFUSION_CELL
    return CONFUSION_LEFT + grid + CONFUSION_RIGHT, CONFUSION_TOP + grid + CONFUSION_BOTTOM


def confusion_figure(matrix, classes, path, title: str | None = None) -> Path:
    """The confusion matrix (K, K) as a heat map with its counts: rows true classes, columns predicted.

    Each row is coloured by its share of the class's images, so rare and common
    classes read alike; ``classes`` names the K rows and columns. The PNG is
    ``confusion_figure_size(K)`` pixels.
    """
    matrix = np.asarray(matrix)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] < 1:
        raise ValueError(f"confusion_figure needs a square (K, K) matrix, not shape {matrix.shape}.")
    K = matrix.shape[0]
    if len(classes) != K:
        raise ValueError(f"confusion_figure got {len(classes)} class names for a {K}x{K} matrix.")
    make = _figure_class()
    fig = make(*confusion_figure_size(K))
    ax = _axes_at(fig, CONFUSION_LEFT, CONFUSION_TOP, K * CONFUSION_CELL, K * CONFUSION_CELL)
    counts = matrix.sum(axis=1, keepdims=True)
    shares = np.divide(matrix, counts, out=np.zeros(matrix.shape), where=counts > 0)
    ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    fontsize = min(9.0, CONFUSION_CELL * 0.3 * 72 / DPI)
    for i in range(K):
        for j in range(K):
            ax.text(j, i, f"{int(matrix[i, j])}", ha="center", va="center", fontsize=fontsize,
                    color="white" if shares[i, j] > 0.5 else "black")
    names = [f"{k} {name}" if name != str(k) else str(k) for k, name in enumerate(classes)]
    ax.set_xticks(range(K), names, rotation=60, ha="right", rotation_mode="anchor", fontsize=8)
    ax.set_yticks(range(K), names, fontsize=8)
    ax.set_ylabel("true class")
    ax.set_xlabel("predicted class")
    right = int(np.trace(matrix))
    fig.suptitle(title or f"confusion matrix: {right:,} of {int(matrix.sum()):,} right "
                 f"({right / max(1, int(matrix.sum())):.2%})", fontsize=11, y=0.995)
    return _save(fig, path)
