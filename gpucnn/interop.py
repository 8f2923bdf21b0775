"""PyTorch interop: weights in and out of gpucnn as ``{name: tensor}`` mappings.

A gpucnn model's ``state_dict()`` uses PyTorch's names and shapes for the same
architecture: ``conv1.weight`` (OC, C, KH, KW), ``conv1.bias`` (OC,),
``fc1.weight`` (OUT, IN) and ``fc1.bias`` (OUT,), under the names the layers
have in the model (``LeNet5``: conv1, conv2, fc1, fc2, fc3; ``vgg-small``:
conv1_1 ... conv3_2, fc1, fc2). A PyTorch module built with the same layer names
(an ``nn.Sequential`` of an OrderedDict, or attributes) has the same keys, so
its ``state_dict()`` loads here and ours loads there:

    from gpucnn import interop
    interop.load_state_dict(model, torch_model.state_dict())       # PyTorch -> gpucnn
    torch_model.load_state_dict(interop.state_dict(model, as_torch=True))   # gpucnn -> PyTorch

torch is imported only when asked for (``as_torch=True``); torch tensors given
to ``load_state_dict`` are read through their own methods (``detach``, ``cpu``,
``numpy``), so gpucnn needs no torch to run.
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np

from gpucnn import backend
from gpucnn.nn import Module


def _is_torch_tensor(value) -> bool:
    """True for a torch.Tensor (or Parameter), told by its class's module so that torch is not imported."""
    return type(value).__module__.split(".")[0] == "torch" and hasattr(value, "detach")


def to_numpy(value, name: str = "value") -> np.ndarray:
    """A torch tensor (any device, with or without grad), a NumPy or CuPy array, or a number, as a NumPy array."""
    if _is_torch_tensor(value):
        tensor = value.detach().cpu()
        if tensor.is_floating_point() and str(tensor.dtype) not in ("torch.float32", "torch.float64"):
            tensor = tensor.float()   # bfloat16 / float16: NumPy holds them as float32
        return tensor.numpy()
    if backend.is_array(value):
        return backend.to_numpy(value)
    array = np.asarray(value)
    if not np.issubdtype(array.dtype, np.number):
        raise TypeError(f"{name} must be a tensor or an array of numbers, not {type(value).__name__}.")
    return array


def load_state_dict(model: Module, state_dict, strict: bool = True):
    """Copy a ``{name: tensor}`` mapping (PyTorch tensors, NumPy or CuPy arrays) into ``model``.

    Names and shapes are PyTorch's (see the module docstring); values are cast to
    the model's dtype and copied to its device. Everything is checked before
    anything is copied, as ``Module.load_state_dict`` does: with ``strict``, a
    missing or unexpected name raises ValueError naming it; a wrong shape always
    does. Returns the skipped names (missing_keys, unexpected_keys).
    """
    if not isinstance(model, Module):
        raise TypeError(f"model must be a gpucnn.nn.Module, not {type(model).__name__}.")
    if not hasattr(state_dict, "items"):
        raise TypeError(f"state_dict must be a mapping of name -> tensor, not {type(state_dict).__name__}.")
    arrays = OrderedDict((str(name), to_numpy(value, f"state_dict entry {name!r}"))
                         for name, value in state_dict.items())
    return model.load_state_dict(arrays, strict=strict)


def state_dict(model: Module, as_torch: bool = False) -> "OrderedDict":
    """The model's ``{name: array}`` (NumPy copies on the host) in PyTorch's names and shapes.

    ``as_torch=True`` gives ``torch.Tensor`` values instead (CPU, the model's
    dtype), ready for ``torch_model.load_state_dict``; it needs torch installed.
    """
    if not isinstance(model, Module):
        raise TypeError(f"model must be a gpucnn.nn.Module, not {type(model).__name__}.")
    arrays = model.state_dict()
    if not as_torch:
        return arrays
    try:
        import torch  # noqa: PLC0415 - only when the caller asks for torch tensors
    except ImportError:
        raise ImportError("state_dict(..., as_torch=True) needs PyTorch (pip install torch); "
                          "without it, pass the NumPy arrays to torch.from_numpy yourself.") from None
    return OrderedDict((name, torch.from_numpy(np.ascontiguousarray(array))) for name, array in arrays.items())
