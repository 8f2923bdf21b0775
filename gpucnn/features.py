"""Looking inside a network: batched layer activations and the input patches that excite each channel.

``layer_features`` runs a data set through a Sequential model in batches (on
the model's device) and returns one layer's activations. ``top_patches`` scans
a data set once and finds, for every channel of the chosen spatial layers, the
k positions (image, oy, ox) with the highest activation, and crops each one's
receptive field out of the input: the region comes from
``gpucnn.receptive.input_region``, the one place for that arithmetic.

Patches are ranked on the layer's own output: for a convolution that is the
pre-activation (conv + bias, before ReLU), which keeps the ranking informative
where many post-ReLU values tie at 0.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm  # a widget in Jupyter, text in a terminal

from gpucnn import backend, nn, ops
from gpucnn.files import write_atomically
from gpucnn.grad_mode import no_grad
from gpucnn.receptive import LayerGeometry, flatten_layers, input_region, layer_geometry, row_names
from gpucnn.utils import check_int

DEFAULT_BATCH_SIZE = 500
PATCH_FORMAT = "gpucnn-top-patches"


def named_layers(model) -> list[tuple[str, nn.Module]]:
    """(name, layer) for each leaf layer of a Sequential model, in forward order (nested names dotted)."""
    if not isinstance(model, nn.Sequential):
        raise TypeError(f"the model must be a gpucnn Sequential (such as LeNet5), not {type(model).__name__}.")
    return list(flatten_layers(model))


def layer_names(model) -> list[str]:
    """Every name whose activation iter_activations gives: the leaf layers and the residual blocks (their
    sums, e.g. ``layer2.1``), in the order layer_geometry lists them."""
    if not isinstance(model, nn.Sequential):
        raise TypeError(f"the model must be a gpucnn Sequential (such as LeNet5), not {type(model).__name__}.")
    return list(row_names(model))


def _run_collecting(module, x, name, wanted, outputs):
    """Run ``module`` (named ``name``) on x, keeping the outputs of the names in ``wanted``; returns
    (output, done) where done means every wanted output is kept and the rest need not run."""
    if isinstance(module, nn.Sequential):
        for child_name, child in module.named_children():
            x, done = _run_collecting(child, x, f"{name}.{child_name}" if name else child_name, wanted, outputs)
            if done:
                return x, True
    elif isinstance(module, nn.Residual):
        (body_name, body), (shortcut_name, shortcut) = module.named_paths()
        through, _ = _run_collecting(body, x, f"{name}.{body_name}" if body_name else name, wanted, outputs)
        across = x if shortcut is None else _run_collecting(shortcut, x, f"{name}.{shortcut_name}", wanted,
                                                            outputs)[0]
        x = ops.add_relu_forward(through, across) if module.relu else ops.add_forward(through, across)
    else:
        x = module(x)
    if name in wanted:
        outputs[name] = x
    return x, len(outputs) == len(wanted)


def _check_images(images, name: str = "images"):
    """images must be a 4-D float array (N, C, H, W) with N >= 1."""
    if not (backend.is_array(images)):
        raise TypeError(f"{name} must be a NumPy or CuPy array (N, C, H, W), not {type(images).__name__}.")
    if images.ndim != 4:
        raise ValueError(f"{name} must have shape (N, C, H, W), got shape {tuple(images.shape)}.")
    if images.dtype not in (np.float32, np.float64):
        raise TypeError(f"{name} must be float32 or float64 (normalised pixels), not {images.dtype}.")
    if images.shape[0] < 1:
        raise ValueError(f"{name} holds no images (shape {tuple(images.shape)}).")


def conv_layer_names(model) -> list[str]:
    """Names of the Conv2d layers of a Sequential model, in forward order (["conv1", "conv2"] for LeNet-5)."""
    return [name for name, layer in named_layers(model) if isinstance(layer, nn.Conv2d)]


def iter_activations(model, images, layers, batch_size: int = DEFAULT_BATCH_SIZE, progress=False, desc=None):
    """Yield ``(start, {layer name: activation batch})`` for consecutive batches of ``images``.

    images (N, C, H, W) float, NumPy or CuPy; each batch is copied to the
    model's device and run in eval mode only as far as the last requested
    layer. Activations stay on the model's device. ``progress`` shows a tqdm
    bar on stderr.
    """
    names = layer_names(model)
    _check_images(images)
    batch_size = check_int(batch_size, "batch_size", 1)
    wanted = list(dict.fromkeys(layers))
    if not wanted:
        raise ValueError("at least one layer name is needed.")
    unknown = [name for name in wanted if name not in names]
    if unknown:
        raise ValueError(f"the model has no layer named {unknown[0]!r}; its layers are {names}.")
    device = model.device
    was_training = model.training
    model.eval()
    try:
        starts = range(0, len(images), batch_size)
        for start in tqdm(starts, desc=desc, unit="batch", disable=not progress, leave=False):
            x = backend.to_device(images[start:start + batch_size], device)
            outputs = {}
            with no_grad():  # only around the layers: a generator's context would leak into the caller's
                _run_collecting(model, x, "", set(wanted), outputs)
            yield start, {name: outputs[name] for name in wanted}
    finally:
        model.train(was_training)


def layer_features(model, images, layer: str, batch_size: int = DEFAULT_BATCH_SIZE, progress=False) -> np.ndarray:
    """The activations of ``layer`` for every image, as a NumPy array (N, ...).

    images (N, C, H, W) float on either device; the model runs on its own device
    in batches of ``batch_size``. For LeNet-5, ``layer="flatten"`` gives the
    (N, 400) output of the convolutional part; "conv1" gives (N, 6, 28, 28). For vgg-small on
    colour 32x32 images "conv3_2" gives (N, 256, 8, 8) and "flatten" (N, 4096).
    """
    if not isinstance(layer, str):
        raise TypeError(f"layer must be a layer name, not {layer!r}.")
    parts = [backend.to_numpy(out[layer])
             for _, out in iter_activations(model, images, [layer], batch_size, progress, desc=f"features {layer}")]
    return np.concatenate(parts, axis=0)


@dataclass
class TopPatches:
    """The k strongest activations of every channel of one layer, with their input crops.

    Arrays are indexed [channel, rank] (rank 0 is the strongest):

    values  (OC, k) float32  the activation at that position
    image   (OC, k) int64    index of the image in the scanned data set
    oy, ox  (OC, k) int64    the output position in the layer
    region  (OC, k, 4) int64 the clipped input box (y0, y1, x0, x1), half-open
    box     (OC, k, 4) int64 the unclipped box, possibly reaching into the padding
    crops   (OC, k, C, RH, RW) float32: the input under ``box``; positions outside
            the image (the zero padding) are NaN, so the pixels of the clipped
            crop are ``crops[c, r, :, y0-by0:y1-by0, x0-bx0:x1-bx0]``

    ``rf`` = (RH, RW) is the layer's receptive field, ``input_hw`` the image size;
    ``info`` is free JSON-able metadata saved along (data set, split, ...).
    """
    layer: str
    rf: tuple
    input_hw: tuple
    values: np.ndarray
    image: np.ndarray
    oy: np.ndarray
    ox: np.ndarray
    region: np.ndarray
    box: np.ndarray
    crops: np.ndarray
    info: dict = field(default_factory=dict)

    @property
    def channels(self) -> int:
        return int(self.values.shape[0])

    @property
    def k(self) -> int:
        return int(self.values.shape[1])

    def clipped_crop(self, channel: int, rank: int) -> np.ndarray:
        """The crop of (channel, rank) without the padding part: (C, y1-y0, x1-x0)."""
        y0, y1, x0, x1 = (int(v) for v in self.region[channel, rank])
        by0, _, bx0, _ = (int(v) for v in self.box[channel, rank])
        return self.crops[channel, rank, :, y0 - by0:y1 - by0, x0 - bx0:x1 - bx0]

    def save(self, path) -> Path:
        """Write every array and the metadata to an .npz file; returns the path."""
        path = Path(path)
        meta = {"format": PATCH_FORMAT, "layer": self.layer, "rf": list(self.rf), "input_hw": list(self.input_hw),
                "info": self.info}
        return write_atomically(path, lambda f: np.savez_compressed(
            f, meta=np.array(json.dumps(meta)), values=self.values, image=self.image, oy=self.oy, ox=self.ox,
            region=self.region, box=self.box, crops=self.crops), durable=False)

    @classmethod
    def load(cls, path) -> "TopPatches":
        """Read a file written by ``save``."""
        path = Path(path)
        with np.load(path, allow_pickle=False) as npz:
            if "meta" not in npz.files:
                raise ValueError(f"{path} is not a top-patches file: it has no 'meta' entry.")
            meta = json.loads(str(npz["meta"]))
            if meta.get("format") != PATCH_FORMAT:
                raise ValueError(f"{path} is not a top-patches file (format {meta.get('format')!r}).")
            arrays = {key: npz[key] for key in ("values", "image", "oy", "ox", "region", "box", "crops")}
        return cls(layer=meta["layer"], rf=tuple(meta["rf"]), input_hw=tuple(meta["input_hw"]),
                   info=meta.get("info") or {}, **arrays)


def _batch_candidates(act, k: int, distinct_images: bool):
    """Per channel, at most k candidate (value, flat position) pairs of one batch, as NumPy arrays.

    act (B, OC, OH, OW) on any device. Flat positions are b*OH*OW + oy*OW + ox
    within the batch. With ``distinct_images`` each image offers only its own
    strongest position (the first one on ties).
    """
    xp = backend.get_array_module(act)
    B, OC, OH, OW = act.shape
    per_image = act.reshape(B, OC, OH * OW)
    if distinct_images:
        pos = per_image.argmax(axis=2)                                    # (B, OC)
        vals = xp.take_along_axis(per_image, pos[:, :, None], axis=2)[:, :, 0]
        flat = xp.arange(B)[:, None] * (OH * OW) + pos
        vals, flat = vals.T, flat.T                                       # (OC, B)
    else:
        vals = per_image.transpose(1, 0, 2).reshape(OC, B * OH * OW)
        flat = xp.broadcast_to(xp.arange(B * OH * OW), vals.shape)
    if vals.shape[1] > k:
        # only the k largest of a batch can reach the running top k
        keep = xp.argpartition(-vals, k - 1, axis=1)[:, :k]
        vals = xp.take_along_axis(vals, keep, axis=1)
        flat = xp.take_along_axis(flat, keep, axis=1)
    return backend.to_numpy(vals).astype(np.float32), backend.to_numpy(flat).astype(np.int64)


def _merge_top(best_vals, best_pos, vals, pos, k: int):
    """Keep the k largest values per row; ties go to the smaller position (earlier image)."""
    vals = np.concatenate([best_vals, vals], axis=1)
    pos = np.concatenate([best_pos, pos], axis=1)
    order = np.stack([np.lexsort((p, -v)) for v, p in zip(vals, pos)])[:, :k]
    return np.take_along_axis(vals, order, axis=1), np.take_along_axis(pos, order, axis=1)


def _crop_boxes(images, row: LayerGeometry, image_idx, oy, ox):
    """(region, box, crops) for the given positions of one layer; see TopPatches."""
    N, C, H, W = images.shape
    OC, k = image_idx.shape
    RH, RW = row.rf
    region = np.zeros((OC, k, 4), np.int64)
    box = np.zeros((OC, k, 4), np.int64)
    crops = np.full((OC, k, C, RH, RW), np.nan, np.float32)
    needed = np.unique(image_idx)
    picked = backend.to_numpy(images[backend.to_device(needed, backend.device_of(images))])
    slot = np.searchsorted(needed, image_idx)          # where each image sits in ``picked``
    for c in range(OC):
        for r in range(k):
            y0, y1, x0, x1 = input_region(row, int(oy[c, r]), int(ox[c, r]), (H, W))
            by0, by1, bx0, bx1 = input_region(row, int(oy[c, r]), int(ox[c, r]), (H, W), clip=False)
            region[c, r] = (y0, y1, x0, x1)
            box[c, r] = (by0, by1, bx0, bx1)
            crops[c, r, :, y0 - by0:y1 - by0, x0 - bx0:x1 - bx0] = picked[slot[c, r], :, y0:y1, x0:x1]
    return region, box, crops


def top_patches(model, images, k: int = 9, layers=None, batch_size: int = DEFAULT_BATCH_SIZE,
                distinct_images: bool = True, progress=False) -> dict[str, TopPatches]:
    """For each channel of each layer, the k input patches that activate it most.

    images (N, C, H, W) float (normalised as for training), NumPy or CuPy; the
    model runs on its device in batches. ``layers`` names spatial layers
    (default: every Conv2d). The activation ranked is the layer's output: for a
    convolution the pre-activation. With ``distinct_images`` (the default) a
    channel's k patches come from k different images, each at that image's
    strongest position; otherwise any k positions of the data set, so
    neighbouring, overlapping positions of one image may fill several places.
    Returns {layer name: TopPatches}, in forward order.
    """
    _check_images(images)
    k = check_int(k, "k", 1)
    batch_size = check_int(batch_size, "batch_size", 1)
    N, C, H, W = images.shape
    rows = {row.name: row for row in layer_geometry(model, (C, H, W))}
    if layers is None:
        layers = conv_layer_names(model)
        if not layers:
            raise ValueError("the model has no Conv2d layer; name the spatial layers to scan.")
    elif isinstance(layers, str):
        layers = [layers]
    layers = list(dict.fromkeys(layers))
    for name in layers:
        if name not in rows:
            raise ValueError(f"the model has no layer named {name!r}; its layers are {list(rows)}.")
        if not rows[name].spatial:
            raise ValueError(f"layer {name} ({rows[name].type}) has no spatial layout, so it has no input patches.")
        positions = N if distinct_images else N * rows[name].output_shape[1] * rows[name].output_shape[2]
        if k > positions:
            what = "images" if distinct_images else "positions"
            raise ValueError(f"k={k} exceeds the {positions} {what} that layer {name} offers in this data set.")

    best = {}
    for start, outputs in iter_activations(model, images, layers, batch_size, progress, desc="top patches"):
        for name, act in outputs.items():
            vals, flat = _batch_candidates(act, k, distinct_images)
            OH, OW = act.shape[2:]
            flat = flat + start * OH * OW           # position in the whole data set
            if name not in best:
                OC = act.shape[1]
                best[name] = (np.empty((OC, 0), np.float32), np.empty((OC, 0), np.int64))
            best[name] = _merge_top(*best[name], vals, flat, k)

    result = {}
    for name in layers:
        row = rows[name]
        OH, OW = row.output_shape[1:]
        vals, flat = best[name]
        image_idx, rest = np.divmod(flat, OH * OW)
        oy, ox = np.divmod(rest, OW)
        region, box, crops = _crop_boxes(images, row, image_idx, oy, ox)
        result[name] = TopPatches(layer=name, rf=tuple(row.rf), input_hw=(H, W), values=vals, image=image_idx,
                                  oy=oy, ox=ox, region=region, box=box, crops=crops)
    return result
