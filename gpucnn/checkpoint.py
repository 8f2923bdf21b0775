"""Checkpoints: nested training state in one ``.npz`` file, written atomically.

A checkpoint holds named *parts* (model weights, optimizer and scheduler state,
epoch, RNG state, run config, ...). Each part may be any nesting of dicts,
lists, tuples, NumPy or CuPy arrays, NumPy scalars, and JSON values. Arrays are
stored as NumPy arrays in the npz (so a checkpoint loads on either device); the
structure around them, with references to the arrays, is stored as JSON in the
entry ``__gpucnn__``, together with the format name and the gpucnn version.
Nothing is pickled.

NumPy scalars keep their dtype through a round trip (an ``np.float32`` step
size comes back as ``np.float32``), so a resumed run computes bit for bit what
an uninterrupted one would.
"""
from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import numpy as np

from gpucnn import __version__, backend
from gpucnn.files import (STALE_TEMP_S, remove_stale_temporaries, require_regular_file,  # noqa: F401 - STALE_TEMP_S
                          write_atomically)
from gpucnn.models import build_model

FORMAT = "gpucnn-checkpoint"
FORMAT_VERSION = 1
META_KEY = "__gpucnn__"
# Single-key dicts with these names mark encoded values inside the JSON structure.
_MARKERS = ("__array__", "__scalar__", "__tuple__", "__items__")


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, not a gpucnn checkpoint, or does not fit the model."""


def _encode(value, path: str, arrays: dict):
    """The JSON-able form of ``value``; arrays go into ``arrays`` under a key derived from ``path``."""
    if backend.is_array(value):
        key = path
        while key in arrays or key == META_KEY:
            key += "_"
        arrays[key] = backend.to_numpy(value)
        return {"__array__": key}
    if isinstance(value, np.generic):
        key = path
        while key in arrays or key == META_KEY:
            key += "_"
        arrays[key] = np.asarray(value)
        return {"__scalar__": key}
    if isinstance(value, dict):
        plain = all(isinstance(k, str) for k in value) and not (len(value) == 1 and next(iter(value)) in _MARKERS)
        if plain:
            return {k: _encode(v, f"{path}/{k}", arrays) for k, v in value.items()}
        return {"__items__": [[_encode(k, f"{path}/key{i}", arrays), _encode(v, f"{path}/{i}", arrays)]
                              for i, (k, v) in enumerate(value.items())]}
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v, f"{path}/{i}", arrays) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, f"{path}/{i}", arrays) for i, v in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"a checkpoint cannot store {path!r} of type {type(value).__name__}; "
                    "use arrays, NumPy scalars, dicts, lists, tuples and JSON values.")


def _decode(value, arrays: dict, path: Path):
    """Invert ``_encode``."""
    if isinstance(value, list):
        return [_decode(v, arrays, path) for v in value]
    if not isinstance(value, dict):
        return value
    if len(value) == 1:
        (marker, inner), = value.items()
        if marker in ("__array__", "__scalar__"):
            if inner not in arrays:
                raise CheckpointError(f"checkpoint {path} is corrupt: its array {inner!r} is missing.")
            return arrays[inner] if marker == "__array__" else arrays[inner][()]
        if marker == "__tuple__":
            return tuple(_decode(v, arrays, path) for v in inner)
        if marker == "__items__":
            return {_decode(k, arrays, path): _decode(v, arrays, path) for k, v in inner}
    return {k: _decode(v, arrays, path) for k, v in value.items()}


def save_checkpoint(path, **parts) -> Path:
    """Write ``parts`` (e.g. ``model=state_dict, optimizer=..., epoch=3``) to the checkpoint ``path``.

    The file is written to a temporary file in the same folder, flushed to disk
    and moved over ``path`` with ``os.replace``: a reader (or a crash) never sees a
    half-written checkpoint, and a failed write leaves the previous file intact.
    A temporary file left by a killed process is deleted by a later save once it
    is older than STALE_TEMP_S. Returns the path.
    """
    path = Path(path)
    if not parts:
        raise ValueError("save_checkpoint needs at least one part to store.")
    for name in parts:
        if name in ("format", "format_version", "gpucnn_version"):
            raise ValueError(f"save_checkpoint part name {name!r} is reserved for the checkpoint header.")
    arrays: dict = {}
    structure = {name: _encode(value, name, arrays) for name, value in parts.items()}
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "gpucnn_version": __version__,
            "parts": structure}
    arrays[META_KEY] = np.array(json.dumps(meta))

    write_atomically(path, lambda f: np.savez(f, **arrays))
    remove_stale_temporaries(path)
    return path


def load_checkpoint(path) -> dict:
    """Read a checkpoint written by ``save_checkpoint``.

    Returns a dict of the stored parts plus ``"gpucnn_version"`` (the version that
    wrote it). Arrays come back as NumPy arrays. Raises CheckpointError naming the
    file when it is missing, not a readable npz, or not a gpucnn checkpoint.
    """
    path = require_regular_file(path, "checkpoint", CheckpointError)
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"checkpoint {path} is not an .npz archive (truncated, corrupt, or another kind of file).")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except MemoryError:
        raise CheckpointError(f"checkpoint {path} is corrupt: an array's header declares more memory than "
                              "there is.") from None
    except Exception as exc:  # noqa: BLE001 - NumPy's header parser raises ValueError, SyntaxError, TokenError, ...
        raise CheckpointError(f"checkpoint {path} is corrupt ({type(exc).__name__}: {exc}).") from None
    if META_KEY not in arrays:
        raise CheckpointError(f"{path} is not a gpucnn checkpoint: it has no {META_KEY} entry.")
    try:
        meta = json.loads(str(arrays.pop(META_KEY)))
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path} is corrupt: its metadata is not JSON ({exc}).") from None
    except RecursionError:
        raise CheckpointError(f"checkpoint {path} is corrupt: its metadata is nested too deeply.") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("parts"), dict):
        raise CheckpointError(f"{path} is not a gpucnn checkpoint: its metadata names no {FORMAT!r} format.")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {meta.get('format_version')!r}; "
                              f"this gpucnn {__version__} reads version {FORMAT_VERSION}.")
    try:
        parts = _decode(meta["parts"], arrays, path)
    except RecursionError:
        raise CheckpointError(f"checkpoint {path} is corrupt: its metadata is nested too deeply.") from None
    except (TypeError, ValueError, AttributeError) as exc:  # a marker holding the wrong kind of value
        raise CheckpointError(f"checkpoint {path} is corrupt: its metadata is malformed ({exc}).") from None
    config = parts.get("config")
    if config is not None and not isinstance(config, dict):
        raise CheckpointError(f"checkpoint {path} is corrupt: its config is a {type(config).__name__}, not a dict.")
    if isinstance(config, dict) and config.get("model") is not None and not isinstance(config["model"], dict):
        raise CheckpointError(f"checkpoint {path} is corrupt: its model config is a "
                              f"{type(config['model']).__name__}, not a dict.")
    parts["gpucnn_version"] = meta.get("gpucnn_version")
    return parts


def check_state_fits(stored: dict, expected: dict, what: str = "model") -> None:
    """Raise CheckpointError unless ``stored`` has exactly the names and shapes of ``expected``.

    Both are name -> array mappings (state dicts). The message names the missing,
    unexpected and mis-shaped entries (the first few of each).
    """
    if not isinstance(stored, dict):
        raise CheckpointError(f"the checkpoint's {what} state is a {type(stored).__name__}, not a dict of arrays.")
    missing = [k for k in expected if k not in stored]
    unexpected = [k for k in stored if k not in expected]
    mis_shaped = [f"{k} is {tuple(np.shape(stored[k]))} in the checkpoint but {tuple(np.shape(expected[k]))} "
                  f"in the {what}" for k in expected if k in stored and np.shape(stored[k]) != np.shape(expected[k])]
    problems = []
    if missing:
        problems.append("missing " + ", ".join(missing[:4]) + (" ..." if len(missing) > 4 else ""))
    if unexpected:
        problems.append("unexpected " + ", ".join(unexpected[:4]) + (" ..." if len(unexpected) > 4 else ""))
    problems.extend(mis_shaped[:4])
    if problems:
        raise CheckpointError(f"the checkpoint does not fit the {what}: " + "; ".join(problems) + ".")


def model_from_checkpoint(checkpoint: dict, device: str = "cpu"):
    """Rebuild the model recorded in a loaded checkpoint's config, load its weights, move it to ``device``.

    ``checkpoint`` is what ``load_checkpoint`` returned; its ``config["model"]``
    is the model's ``config`` (``build_model(**config)`` rebuilds it).
    """
    if not isinstance(checkpoint, dict) or "model" not in checkpoint:
        raise CheckpointError("the checkpoint holds no model weights.")
    model_config = (checkpoint.get("config") or {}).get("model")
    if not isinstance(model_config, dict) or "name" not in model_config:
        raise CheckpointError("the checkpoint does not record which model it holds (config['model'] is missing).")
    try:
        model = build_model(**model_config)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"the checkpoint's model {model_config} cannot be built: {exc}") from None
    check_state_fits(checkpoint["model"], model.state_dict())
    model.load_state_dict(checkpoint["model"])
    return model.to(device)


def rule_name(optimizer) -> str:
    """The gpucnn.optim class name of an optimizer, fused or not ("Adam" for a fused Adam)."""
    return type(getattr(optimizer, "rule", optimizer)).__name__


def check_resumable(ckpt: dict, path, model, optimizer, scheduler, generators: dict, *, seed: int,
                    batch_size: int, ranks: int, steps_per_epoch: int) -> None:
    """Raise CheckpointError (or ValueError for a run setting) unless ``ckpt`` can continue this run exactly.

    ``ckpt`` is what ``load_checkpoint(path)`` returned; the rest describes the run
    that would continue it: its model, optimizer and scheduler (or None), the
    model's random generators (``"module.attribute" -> Generator``), the seed,
    batch size, number of ranks, and steps in one epoch of its training data.
    """
    missing = [k for k in ("model", "optimizer", "scheduler", "epoch", "step", "rng", "trainer") if k not in ckpt]
    if missing:
        raise CheckpointError(f"checkpoint {path} cannot be resumed: it lacks {', '.join(missing)}.")
    check_state_fits(ckpt["model"], model.state_dict())
    # Same shapes do not make the same model (lenet5 and lenet5-classic share every shape).
    stored_name = ((ckpt.get("config") or {}).get("model") or {}).get("name")
    own_name = (getattr(model, "config", None) or {}).get("name")
    if stored_name is not None and own_name is not None and stored_name != own_name:
        raise CheckpointError(f"checkpoint {path} holds a {stored_name} model, but this run trains {own_name}.")
    _check_trainer_state(ckpt, path)
    state = ckpt["trainer"]
    if state["seed"] != seed or state["batch_size"] != batch_size:
        raise ValueError(f"checkpoint {path} was trained with seed {state['seed']} and batch size "
                         f"{state['batch_size']}; resume with the same (got seed {seed}, "
                         f"batch size {batch_size}) so the batch order continues.")
    stored_ranks = state.get("ranks", 1)  # checkpoints from before distributed training: one process
    if stored_ranks != ranks:
        raise ValueError(f"checkpoint {path} was trained on {stored_ranks} rank(s) with batch size {batch_size} "
                         f"each; resume it on {stored_ranks} (got {ranks}) so the batch order continues.")
    for part, obj in (("optimizer", optimizer), ("scheduler", scheduler)):
        stored = state[f"{part}_class"]
        current = None if obj is None else rule_name(obj)
        if stored != current:
            raise CheckpointError(f"checkpoint {path} holds {part} {stored} state, but this run uses {current}.")
    if not 0 <= ckpt["step"] < steps_per_epoch:
        raise CheckpointError(f"checkpoint {path} stopped at step {ckpt['step']} of an epoch, but an epoch "
                              f"here has {steps_per_epoch} steps; resume on the same training data.")
    if set(ckpt["rng"]) != set(generators):
        raise CheckpointError(f"checkpoint {path} holds random generators {sorted(ckpt['rng'])}, "
                              f"but the model has {sorted(generators)}.")


TRAINER_KEYS = ("seed", "batch_size", "best_accuracy", "partial", "optimizer_class", "scheduler_class")
PARTIAL_KEYS = ("loss", "correct", "seen", "steps", "seconds")


def _check_trainer_state(ckpt: dict, path) -> None:
    """CheckpointError unless the trainer's entries of ``ckpt`` have the keys and kinds a resume reads."""
    state = ckpt["trainer"]
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} cannot be resumed: its trainer state is a "
                              f"{type(state).__name__}, not a dict.")
    missing = [key for key in TRAINER_KEYS if key not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} cannot be resumed: its trainer state lacks {', '.join(missing)}.")
    partial = state["partial"]
    if partial is not None and (not isinstance(partial, dict) or any(k not in partial for k in PARTIAL_KEYS)):
        raise CheckpointError(f"checkpoint {path} cannot be resumed: its partial epoch is malformed.")
    for key in ("epoch", "step"):
        if not isinstance(ckpt[key], (int, np.integer)) or isinstance(ckpt[key], bool) or ckpt[key] < 0:
            raise CheckpointError(f"checkpoint {path} cannot be resumed: its {key} is {ckpt[key]!r}, "
                                  "not a count.")
    if not isinstance(ckpt["rng"], dict):
        raise CheckpointError(f"checkpoint {path} cannot be resumed: its rng entry is a "
                              f"{type(ckpt['rng']).__name__}, not a dict.")
