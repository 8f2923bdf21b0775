"""Parameter, Module and Sequential: the containers every layer is built from.

Besides parameters a module may hold buffers (``register_buffer``): arrays saved in
``state_dict`` and checkpoints that the optimizer never sees, such as BatchNorm's
running statistics. Float buffers move with ``to()`` and are cast by ``double()``;
integer buffers (a counter) stay NumPy arrays on the host.

There is no autograd graph. Each layer keeps what its backward needs from its
last forward call, and ``backward(grad_output) -> grad_input`` both returns the
gradient for its input and adds the gradients of its own parameters into
``Parameter.grad``. ``Sequential.backward`` walks its layers in reverse.

Arrays are NumPy (CPU) or CuPy (GPU); ``Module.to(device)`` moves parameters,
and inputs must live on the same device as the parameters of the layer they
enter.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Iterator, NamedTuple

import numpy as np

from gpucnn import backend, ops
from gpucnn.grad_mode import is_grad_enabled
from gpucnn.ops import FLOAT_DTYPES  # noqa: F401 - defined once in gpucnn.ops, also importable here
from gpucnn.utils import pair


def check_pair(value, name: str, minimum: int) -> tuple[int, int]:
    """``pair(value)`` with both entries at least ``minimum``."""
    a, b = pair(value, name)
    if a < minimum or b < minimum:
        raise ValueError(f"{name} must be at least {minimum} in both dimensions, got {(a, b)}.")
    return (a, b)


class Parameter:
    """A learnable array: ``data`` holds the values, ``grad`` the accumulated gradient.

    ``grad`` is None until a backward pass adds to it; later backward passes add
    (``+=``) rather than overwrite, so call ``zero_grad()`` between steps.
    """

    def __init__(self, data):
        if not backend.is_array(data):
            raise TypeError(f"Parameter data must be a NumPy or CuPy array, not {type(data).__name__}.")
        if np.dtype(data.dtype) not in FLOAT_DTYPES:
            raise TypeError(f"Parameter data must be float32 or float64, not {data.dtype}.")
        self.data = data
        self.grad = None
        # Where a fused optimizer's zero_grad(set_to_none=True) wants the next gradient (its flat
        # buffer's view); a layer's backward writes straight into it (see grad_target).
        self.grad_buffer = None

    def grad_target(self):
        """The array the next backward may write this gradient into directly (then passed to
        accumulate_grad as is), or None: there is a gradient to add to, or no buffer waits for one."""
        return self.grad_buffer if self.grad is None else None

    @property
    def shape(self) -> tuple:
        return tuple(self.data.shape)

    @property
    def dtype(self):
        return self.data.dtype

    @property
    def size(self) -> int:
        return int(self.data.size)

    @property
    def device(self) -> str:
        return backend.device_of(self.data)

    def accumulate_grad(self, grad) -> None:
        """Add ``grad`` (same shape as ``data``) into ``self.grad``."""
        if tuple(grad.shape) != self.shape:
            raise ValueError(f"gradient of shape {tuple(grad.shape)} does not match parameter shape {self.shape}.")
        if self.grad is None and self.grad_buffer is not None:
            if grad is not self.grad_buffer:  # a layer that computed it elsewhere: added into the zeroed buffer
                ops.fill(self.grad_buffer, 0.0)
                ops.add_into(self.grad_buffer, grad)
            self.grad = self.grad_buffer
        elif self.grad is None:
            # A kernel device's gradient is a fresh launcher output: it is kept, not copied.
            keep = backend.device_of(grad) in backend.KERNEL_DEVICES and grad.dtype == self.data.dtype
            self.grad = grad if keep else grad.astype(self.data.dtype, copy=True)
        else:
            ops.add_into(self.grad, grad)

    def __repr__(self) -> str:
        return f"Parameter(shape={self.shape}, dtype={self.dtype}, device={self.device})"


class IncompatibleKeys(NamedTuple):
    """What ``load_state_dict(strict=False)`` skipped."""
    missing_keys: list
    unexpected_keys: list


_NO_GRAD = "no_grad"  # the cache key marking a forward that ran under no_grad()


class Module:
    """Base class of layers and models (PyTorch-style, with explicit backward).

    Parameters and submodules assigned as attributes are registered in
    assignment order, which fixes the order of ``parameters()`` and the names
    of ``named_parameters()`` / ``state_dict()`` (``"conv1.weight"``, ``"0.bias"``).
    """

    def __init__(self):
        object.__setattr__(self, "_parameters", OrderedDict())
        object.__setattr__(self, "_modules", OrderedDict())
        object.__setattr__(self, "_buffers", OrderedDict())
        object.__setattr__(self, "_cache", {})
        object.__setattr__(self, "_device", "cpu")
        object.__setattr__(self, "training", True)

    # --- registration -------------------------------------------------------
    def __setattr__(self, name, value):
        params = self.__dict__.get("_parameters")
        if params is None:
            raise RuntimeError(f"{type(self).__name__}.__init__ must call Module.__init__() before setting attributes.")
        modules = self.__dict__["_modules"]
        params.pop(name, None)
        modules.pop(name, None)
        buffers = self.__dict__["_buffers"]
        if name in buffers:
            if not backend.is_array(value):
                raise TypeError(f"buffer {name!r} must stay an array, not {type(value).__name__}.")
            buffers[name] = value
        elif isinstance(value, Parameter):
            params[name] = value
        elif isinstance(value, Module):
            modules[name] = value
        object.__setattr__(self, name, value)

    def register_buffer(self, name: str, array) -> None:
        """Hold ``array`` as buffer ``name`` (an attribute too): saved in state_dict, not a parameter."""
        if not isinstance(name, str) or not name or "." in name:
            raise ValueError(f"buffer name must be a non-empty string without '.', not {name!r}.")
        if not backend.is_array(array):
            raise TypeError(f"buffer {name!r} must be a NumPy or CuPy array, not {type(array).__name__}.")
        if name in self._parameters or name in self._modules:
            raise ValueError(f"{name!r} is already a parameter or submodule of {type(self).__name__}.")
        self._buffers[name] = array
        object.__setattr__(self, name, array)

    def __delattr__(self, name):
        self._buffers.pop(name, None)
        self._parameters.pop(name, None)
        self._modules.pop(name, None)
        object.__delattr__(self, name)

    # --- forward / backward -------------------------------------------------
    def __call__(self, x):
        return self.forward(x)

    def forward(self, x):
        raise NotImplementedError(f"{type(self).__name__} does not define forward().")

    def backward(self, grad_output, input_grad=True):
        """Add the parameters' gradients and return the input's (None when ``input_grad`` is False).

        ``input_grad=False`` is for a model's first layer, whose input (the images) needs no
        gradient: the layer then skips computing it, as the Trainer asks.
        """
        raise NotImplementedError(f"{type(self).__name__} does not define backward().")

    def _save(self, **arrays) -> None:
        """Keep what backward needs from this forward call (replacing the last one's); under
        ``no_grad()`` keep nothing but the mark that this forward ran there."""
        self._cache = dict(arrays) if is_grad_enabled() else {_NO_GRAD: True}

    def _saved(self, name):
        if name not in self._cache:
            if _NO_GRAD in self._cache:
                raise RuntimeError(f"{self!r}: backward() after a forward under gpucnn.no_grad(), which keeps "
                                   "nothing for backward; run the forward outside no_grad().")
            raise RuntimeError(f"{self!r}: backward() was called before forward().")
        return self._cache[name]

    def _check_grad_output(self, grad_output):
        """grad_output must be an array shaped like the last forward's output."""
        expected = self._saved("output_shape")
        if not backend.is_array(grad_output):
            raise TypeError(f"{self!r}: grad_output must be a NumPy or CuPy array, not {type(grad_output).__name__}.")
        if tuple(grad_output.shape) != expected:
            raise ValueError(f"{self!r}: grad_output has shape {tuple(grad_output.shape)}, "
                             f"but the last forward produced shape {expected}.")

    def _check_input(self, x, ndim: int | None = None, channels: int | None = None, channels_name="channels"):
        """Validate an input array: type, ndim, no zero-length axis, size of axis 1, float dtype, device.

        Layers with parameters require the input dtype to equal the parameter
        dtype (float32 unless ``double()`` was called); inputs are never
        converted silently. Layers without parameters take float32 or float64.
        """
        if not backend.is_array(x):
            raise TypeError(f"{self!r} expects a NumPy or CuPy array, got {type(x).__name__}.")
        shape = tuple(x.shape)
        if ndim is not None and x.ndim != ndim:
            raise ValueError(f"{self!r} expected a {ndim}-D input, got shape {shape}.")
        if 0 in shape:
            raise ValueError(f"{self!r} got an empty input of shape {shape}; every dimension must be at least 1.")
        if channels is not None and shape[1] != channels:
            raise ValueError(f"{self!r} expected input with {channels} {channels_name}, got shape {shape}.")
        own = list(self._parameters.values())
        if own:
            want = own[0].dtype
            if x.dtype != want:
                raise TypeError(f"{self!r} expected {want} input (like its parameters), got {x.dtype}; "
                                f"convert the input with x.astype({want.name}).")
            x_device, p_device = backend.device_of(x), own[0].device
            if x_device != p_device:
                raise ValueError(f"input is on {x_device} but {type(self).__name__}'s parameters are on "
                                 f"{p_device} ({self!r}, input shape {shape}); call model.to({x_device!r}) "
                                 "or move the input.")
        elif np.dtype(x.dtype) not in FLOAT_DTYPES:
            raise TypeError(f"{self!r} expected float32 or float64 input, got {x.dtype}; "
                            "convert the input with x.astype(np.float32).")

    # --- traversal ----------------------------------------------------------
    def named_children(self) -> Iterator[tuple[str, "Module"]]:
        yield from self._modules.items()

    def children(self) -> Iterator["Module"]:
        for _, module in self.named_children():
            yield module

    def named_modules(self, prefix: str = "") -> Iterator[tuple[str, "Module"]]:
        """This module (name ``prefix``) and every descendant, depth first."""
        yield prefix, self
        for name, child in self._modules.items():
            yield from child.named_modules(f"{prefix}.{name}" if prefix else name)

    def modules(self) -> Iterator["Module"]:
        for _, module in self.named_modules():
            yield module

    def named_parameters(self, prefix: str = "") -> Iterator[tuple[str, Parameter]]:
        """``(name, Parameter)`` pairs: own parameters first, then each child's, in order."""
        seen = set()
        for module_name, module in self.named_modules(prefix):
            for name, param in module._parameters.items():
                if id(param) in seen:
                    continue
                seen.add(id(param))
                yield (f"{module_name}.{name}" if module_name else name), param

    def parameters(self) -> Iterator[Parameter]:
        for _, param in self.named_parameters():
            yield param

    def named_buffers(self, prefix: str = "") -> Iterator[tuple[str, object]]:
        """``(name, array)`` pairs of every buffer (``"bn1.running_mean"``), module by module."""
        for module_name, module in self.named_modules(prefix):
            for name, array in module._buffers.items():
                yield (f"{module_name}.{name}" if module_name else name), array

    def buffers(self) -> Iterator[object]:
        for _, array in self.named_buffers():
            yield array

    def _named_state(self) -> Iterator[tuple[str, object, object]]:
        """(name, owner, key) of every state_dict entry in PyTorch's order: per module its parameters, then
        its buffers; owner is the Parameter or the module holding buffer ``key``."""
        seen = set()
        for module_name, module in self.named_modules():
            prefix = f"{module_name}." if module_name else ""
            for name, param in module._parameters.items():
                if id(param) not in seen:
                    seen.add(id(param))
                    yield prefix + name, param, None
            for name in module._buffers:
                yield prefix + name, module, name

    def num_parameters(self) -> int:
        """Total number of learnable scalars."""
        return sum(p.size for p in self.parameters())

    # --- modes and gradients ------------------------------------------------
    def train(self, mode: bool = True) -> "Module":
        """Training mode (Dropout active) for this module and all descendants; returns self."""
        for module in self.modules():
            object.__setattr__(module, "training", bool(mode))
        return self

    def eval(self) -> "Module":
        """Evaluation mode (Dropout is the identity); returns self."""
        return self.train(False)

    def zero_grad(self) -> None:
        """Set every parameter's grad to None (the next backward starts afresh)."""
        for param in self.parameters():
            param.grad = None

    # --- devices and dtypes -------------------------------------------------
    @property
    def device(self) -> str:
        """``"cpu"`` or ``"gpu"``: where the parameters live (the last ``to()`` for parameter-free modules)."""
        for param in self.parameters():
            return param.device
        return self._device

    def to(self, device: str) -> "Module":
        """Move parameters and grads to ``"cpu"``/``"gpu"``/``"emulator"`` (``"auto"`` allowed); returns self.

        The kernel devices (gpu, emulator) run float32 kernels, so float64 parameters (after
        ``double()``) are refused there with a ValueError. Saved forward state is dropped, so run
        forward again before backward.
        """
        target = backend.resolve_device(device)
        if target in backend.KERNEL_DEVICES:
            wide = [(name, p.dtype) for name, p in self.named_parameters() if p.dtype != np.float32]
            if wide:
                name, dtype = wide[0]
                raise ValueError(f"the {target} runs gpucnn's float32 kernels, but parameter {name} is {dtype}; "
                                 f"call model.float() before model.to({target!r}).")
        for param in self.parameters():
            param.data = backend.to_device(param.data, target)
            if param.grad is not None:
                param.grad = backend.to_device(param.grad, target)
        for module in self.modules():
            for name, array in module._buffers.items():
                if array.dtype.kind == "f":
                    setattr(module, name, backend.to_device(array, target))
            object.__setattr__(module, "_device", target)
            module._cache = {}
        return self

    def _cast(self, dtype) -> "Module":
        for param in self.parameters():
            param.data = param.data.astype(dtype)
            if param.grad is not None:
                param.grad = param.grad.astype(dtype)
        for module in self.modules():
            for name, array in module._buffers.items():
                if array.dtype.kind == "f":
                    setattr(module, name, array.astype(dtype))
            module._cache = {}
        return self

    def double(self) -> "Module":
        """Cast parameters to float64 (for gradient checks); returns self."""
        return self._cast(np.float64)

    def float(self) -> "Module":
        """Cast parameters to float32 (the default); returns self."""
        return self._cast(np.float32)

    # --- checkpoints --------------------------------------------------------
    def state_dict(self) -> "OrderedDict[str, np.ndarray]":
        """Ordered ``name -> NumPy array`` copies of every parameter and buffer (on the CPU).

        PyTorch's order: module by module, its parameters then its buffers
        (``"bn1.weight"``, ``"bn1.bias"``, ``"bn1.running_mean"``, ...).
        """
        return OrderedDict((name, np.array(backend.to_numpy(_state_value(owner, key)), copy=True))
                           for name, owner, key in self._named_state())

    def load_state_dict(self, state, strict: bool = True) -> IncompatibleKeys:
        """Copy arrays from ``state`` into the parameters and buffers, on their current device.

        Everything is checked before anything is copied: with ``strict`` (the
        default) missing or unexpected names raise ValueError naming them; a
        shape mismatch always raises ValueError. Buffers are written in place
        (a recorded training step keeps updating the same arrays). Returns the
        skipped names.
        """
        if not hasattr(state, "keys") or not hasattr(state, "__getitem__"):
            raise TypeError(f"state must be a mapping of name -> array, not {type(state).__name__}.")
        own = OrderedDict((name, (owner, key)) for name, owner, key in self._named_state())
        missing = [name for name in own if name not in state]
        unexpected = [name for name in state.keys() if name not in own]
        if strict and (missing or unexpected):
            parts = []
            if missing:
                parts.append(f"missing keys {missing}")
            if unexpected:
                parts.append(f"unexpected keys {unexpected}")
            raise ValueError(f"state_dict does not match {type(self).__name__}: {' and '.join(parts)}.")
        values = {}
        for name, (owner, key) in own.items():
            if name not in state:
                continue
            value = backend.to_numpy(state[name])
            target = _state_value(owner, key)
            integer_buffer = key is not None and target.dtype.kind in "iu"
            if value.dtype.kind not in ("iu" if integer_buffer else "f"):
                # integer, complex or bool weights: a tampered or foreign file (a counter buffer is an integer)
                raise TypeError(f"state_dict entry {name!r} must be a{'n integer' if integer_buffer else ' float'} "
                                f"array, not {value.dtype}.")
            if tuple(value.shape) != tuple(target.shape):
                kind = "parameter" if key is None else "buffer"
                raise ValueError(f"state_dict entry {name!r} has shape {tuple(value.shape)}, "
                                 f"but the {kind} has shape {tuple(target.shape)}.")
            if not integer_buffer and not np.isfinite(value).all():
                bad = int(np.count_nonzero(~np.isfinite(value)))
                raise ValueError(f"state_dict entry {name!r} holds NaN or infinite values ({bad} of {value.size}); "
                                 "such weights give NaN outputs.")
            values[name] = value
        for name, value in values.items():
            owner, key = own[name]
            if key is None:
                owner.data = backend.to_device(np.array(value, dtype=owner.dtype, copy=True), owner.device)
            else:
                buffer = getattr(owner, key)
                buffer[...] = backend.to_device(np.asarray(value, dtype=buffer.dtype), backend.device_of(buffer))
        return IncompatibleKeys(missing, unexpected)

    # --- printing -----------------------------------------------------------
    def extra_repr(self) -> str:
        """The text inside the parentheses of this module's one-line repr."""
        return ""

    def __repr__(self) -> str:
        if not self._modules:
            return f"{type(self).__name__}({self.extra_repr()})"
        lines = [f"{type(self).__name__}("]
        for name, child in self._modules.items():
            child_text = repr(child).replace("\n", "\n  ")
            lines.append(f"  ({name}): {child_text}")
        lines.append(")")
        return "\n".join(lines)


def fused_relus(layers) -> set:
    """Indexes of the ReLUs (exactly nn.ReLU) right after a layer that runs a following ReLU in its own
    forward and backward (``fuses_next_relu``: BatchNorm)."""
    from gpucnn.nn.activation import ReLU  # noqa: PLC0415 - activation imports this module

    return {i for i in range(1, len(layers))
            if type(layers[i]) is ReLU and getattr(layers[i - 1], "fuses_next_relu", False)}


def _state_value(owner, key):
    """The array behind one state_dict entry: a Parameter's data, or buffer ``key`` of a module."""
    return owner.data if key is None else getattr(owner, key)


class Sequential(Module):
    """Layers applied in order; ``backward`` runs them in reverse.

    ``Sequential(conv, relu, ...)`` names the layers ``"0"``, ``"1"``, ...;
    ``Sequential(OrderedDict(conv1=..., relu1=...))`` keeps the given names,
    which become attributes (``model.conv1``). Indexable (``model[0]``,
    ``model[-1]``, slices give a Sequential), iterable, and sized.
    """

    def __init__(self, *layers):
        super().__init__()
        if len(layers) == 1 and isinstance(layers[0], dict):
            items = list(layers[0].items())
        else:
            items = [(str(i), layer) for i, layer in enumerate(layers)]
        for name, layer in items:
            self.add(name, layer)

    def add(self, name: str, layer: Module) -> None:
        """Append ``layer`` under ``name``."""
        if not isinstance(layer, Module):
            raise TypeError(f"Sequential layers must be Modules, but {name!r} is a {type(layer).__name__}.")
        if not isinstance(name, str) or not name or "." in name:
            raise ValueError(f"layer name must be a non-empty string without '.', not {name!r}.")
        if name in self._modules or hasattr(type(self), name):
            raise ValueError(f"layer name {name!r} is already taken in {type(self).__name__}.")
        setattr(self, name, layer)

    def append(self, layer: Module) -> "Sequential":
        """Append ``layer`` under the next free number; returns self."""
        self.add(str(len(self)), layer)
        return self

    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self) -> Iterator[Module]:
        return iter(list(self._modules.values()))

    def __getitem__(self, index):
        names = list(self._modules)
        if isinstance(index, slice):
            return Sequential(OrderedDict((n, self._modules[n]) for n in names[index]))
        if isinstance(index, str):
            if index not in self._modules:
                raise KeyError(f"{type(self).__name__} has no layer named {index!r}.")
            return self._modules[index]
        if not hasattr(index, "__index__") or isinstance(index, bool):
            raise TypeError(f"Sequential indices must be ints, slices or names, not {type(index).__name__}.")
        i = int(index)
        if not -len(names) <= i < len(names):
            raise IndexError(f"index {i} is out of range for a Sequential of {len(names)} layers.")
        return self._modules[names[i]]

    def forward(self, x):
        """Apply every layer in order (a ReLU right after a BatchNorm runs inside it: one pass fewer)."""
        layers = list(self._modules.values())
        fused = fused_relus(layers)
        object.__setattr__(self, "_last_fused", fused)
        for i, layer in enumerate(layers):
            if i in fused:
                continue
            x = layer.forward(x, relu=True) if i + 1 in fused else layer(x)
        return x

    def backward(self, grad_output, input_grad=True):
        """Back-propagate through the layers in reverse; returns the gradient for the input.

        With ``input_grad=False`` the first layer computes no input gradient and None is returned.
        """
        layers = list(self._modules.values())
        fused = getattr(self, "_last_fused", ())
        for i in range(len(layers) - 1, -1, -1):
            if i not in fused:  # a fused ReLU's backward ran in the layer before it
                grad_output = layers[i].backward(grad_output, input_grad=input_grad or i > 0)
        return grad_output
