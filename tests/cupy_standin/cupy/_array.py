"""The stand-in's ndarray: host memory behind CuPy's rules.

Refused as CuPy refuses them: implicit conversion to NumPy (``numpy.asarray(x)``: TypeError), NumPy
arrays as operands of device operations ("Unsupported type": TypeError), a non-scalar NumPy array
assigned into a device array ("non-scalar numpy.ndarray cannot be used for fill": ValueError).
Every operation runs on the current stream (cupy.cuda.stream), so captures and stream order apply.
"""
from __future__ import annotations

import operator

import numpy as np

from cupy.cuda import stream as _stream

_SCALARS = (bool, int, float, complex, np.generic)


def _refuse(value):
    raise TypeError(f"Unsupported type {type(value)}")


def _device_arrays(value, found):
    """Collect the stand-in arrays in ``value`` (nested lists/tuples/dicts)."""
    if isinstance(value, ndarray):
        found.append(value)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _device_arrays(item, found)
    elif isinstance(value, dict):
        for item in value.values():
            _device_arrays(item, found)
    return found


def _unwrap(value, strict=True):
    """``value`` with stand-in arrays replaced by their host arrays; NumPy arrays refused when ``strict``."""
    if isinstance(value, ndarray):
        return value._a
    if isinstance(value, np.ndarray):
        if strict:
            _refuse(value)
        return value
    if isinstance(value, (list, tuple)):
        return type(value)(_unwrap(v, strict) for v in value)
    if isinstance(value, dict):
        return {k: _unwrap(v, strict) for k, v in value.items()}
    return value


def _is_view(result, inputs):
    root = _stream._root(result)
    return any(_stream._root(a._a) is root for a in inputs)


def _wrap_result(result, inputs, what):
    """A NumPy result as the stand-in's: a view of an input stays a view; anything else is a new allocation."""
    if isinstance(result, tuple):
        return tuple(_wrap_result(r, inputs, what) for r in result)
    if isinstance(result, list):
        return [_wrap_result(r, inputs, what) for r in result]
    if isinstance(result, np.generic):
        result = np.asarray(result)  # CuPy's reductions return 0-d device arrays
    if not isinstance(result, np.ndarray):
        return result
    if not _is_view(result, inputs):
        _stream.allocate(result, written=False, what=what)
        _stream.run_now(_stream.get_current_stream(), None, [a._a for a in inputs], (result,), what)
    return wrap(result)


def call(func, args, kwargs, what, strict=True, owner=None):
    """``func`` (a NumPy callable; a method of ``owner``'s host array) on device arguments: in place
    into ``out=`` or into a new array."""
    inputs = _device_arrays((args, kwargs), [] if owner is None else [owner])
    out = kwargs.get("out")
    outs = [o for o in (out if isinstance(out, tuple) else (out,)) if isinstance(o, ndarray)]
    uargs, ukwargs = _unwrap(args, strict), _unwrap(kwargs, strict)
    if outs:
        reads = [a._a for a in inputs if all(a is not o for o in outs)]
        _stream.launch(lambda: func(*uargs, **ukwargs), reads, [o._a for o in outs], what=what)
        return out
    if _stream._captures and inputs:
        # a view is fine in a capture; anything computed now would be a stale, unrecorded result
        result = func(*uargs, **ukwargs)
        if isinstance(result, np.ndarray) and _is_view(result, inputs):
            return wrap(result)
        _stream._refuse_in_capture(what)
    return _wrap_result(func(*uargs, **ukwargs), inputs, what)


def wrap(host_array):
    """A stand-in array over ``host_array`` (no copy, no accounting: callers allocate)."""
    array = object.__new__(ndarray)
    array._a = host_array
    return array


def _binary(ufunc, reflected=False):
    def op(self, other):
        if isinstance(other, np.ndarray):
            _refuse(other)
        if not isinstance(other, (ndarray, *_SCALARS)):
            return NotImplemented
        args = (other, self) if reflected else (self, other)
        return call(ufunc, args, {}, f"cupy.{ufunc.__name__}")
    return op


def _inplace(ufunc):
    def op(self, other):
        if isinstance(other, np.ndarray):
            _refuse(other)
        call(ufunc, (self, other), {"out": self}, f"cupy.{ufunc.__name__} (in place)")
        return self
    return op


def _unary(ufunc):
    def op(self):
        return call(ufunc, (self,), {}, f"cupy.{ufunc.__name__}")
    return op


class ndarray:
    """CuPy's ndarray (``cupy.ndarray(shape, dtype=float, memptr=None, strides=None, order='C')``), on the host."""

    __array_priority__ = 100

    def __init__(self, shape, dtype=float, memptr=None, strides=None, order="C"):
        self._a = np.empty(shape, dtype=dtype, order=order)
        _stream.allocate(self._a, written=False, what="cupy.ndarray(...)")

    # ---- what CuPy refuses ------------------------------------------------------------
    def __array__(self, dtype=None, copy=None):
        raise TypeError("Implicit conversion to a NumPy array is not allowed. Please use `.get()` to construct "
                        "a NumPy array explicitly.")

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        for value in inputs:
            if isinstance(value, np.ndarray):
                _refuse(value)
        return call(getattr(ufunc, method), inputs, kwargs, f"cupy.{ufunc.__name__}")

    def __array_function__(self, func, types, args, kwargs):
        return call(func, args, kwargs, f"cupy.{func.__name__}")

    # ---- attributes --------------------------------------------------------------------
    shape = property(lambda self: self._a.shape)
    dtype = property(lambda self: self._a.dtype)
    size = property(lambda self: self._a.size)
    ndim = property(lambda self: self._a.ndim)
    strides = property(lambda self: self._a.strides)
    itemsize = property(lambda self: self._a.itemsize)
    nbytes = property(lambda self: self._a.nbytes)
    flags = property(lambda self: self._a.flags)
    T = property(lambda self: wrap(self._a.T))

    @property
    def data(self):
        class MemoryPointer:  # CuPy's cupy.cuda.MemoryPointer: only ``ptr`` is used
            ptr = self._a.ctypes.data
        return MemoryPointer()

    @property
    def device(self):
        from cupy.cuda import Device  # noqa: PLC0415

        return Device(0)

    def __getattr__(self, name):
        if name.startswith("__") or name == "_a":  # no __array_interface__: NumPy must not see the memory
            raise AttributeError(f"'cupy.ndarray' (the gpucnn stand-in) has no attribute {name!r}")
        attr = getattr(self._a, name)
        if not callable(attr):
            return wrap(attr) if isinstance(attr, np.ndarray) else attr
        return lambda *args, **kwargs: call(attr, args, kwargs, f"ndarray.{name}", owner=self)

    # ---- writes ------------------------------------------------------------------------
    def fill(self, value):
        if isinstance(value, np.ndarray) and value.ndim:
            raise ValueError("non-scalar numpy.ndarray cannot be used for fill")
        if isinstance(value, ndarray):
            raise TypeError("a cupy.ndarray cannot be used for fill")
        _stream.launch(lambda: self._a.fill(value), (), (self._a,), what="ndarray.fill")

    def __setitem__(self, key, value):
        ukey = _unwrap(key, strict=False)
        key_arrays = [a._a for a in _device_arrays(key, [])]
        if isinstance(value, ndarray):
            _stream.launch(lambda: self._a.__setitem__(ukey, value._a), [value._a, *key_arrays], (self._a,),
                           what="ndarray.__setitem__")
            return
        if isinstance(value, np.ndarray) and value.ndim:
            raise ValueError("non-scalar numpy.ndarray cannot be used for fill")
        if not isinstance(value, (*_SCALARS, np.ndarray)):
            _refuse(value)
        _stream.launch(lambda: self._a.__setitem__(ukey, value), key_arrays, (self._a,), what="ndarray.__setitem__")

    def set(self, arr, stream=None):
        if not isinstance(arr, np.ndarray):
            raise TypeError(f"Only numpy.ndarray can be set to cupy.ndarray, not {type(arr)}")
        if arr.shape != self.shape:
            raise ValueError("Shape mismatch")
        host = np.array(arr, dtype=self.dtype)
        _stream.launch(lambda: np.copyto(self._a, host), (), (self._a,), stream=stream, what="ndarray.set")

    # ---- reads on the host ---------------------------------------------------------------
    def get(self, stream=None, order="C", out=None, blocking=True):
        _stream.host_read([self._a], "ndarray.get")
        if out is not None:
            np.copyto(out, self._a)
            return out
        return np.array(self._a, order=order)

    def item(self, *args):
        _stream.host_read([self._a], "ndarray.item")
        return self._a.item(*args)

    def tolist(self):
        _stream.host_read([self._a], "ndarray.tolist")
        return self._a.tolist()

    def __float__(self):
        return float(self.item())

    def __int__(self):
        return int(self.item())

    def __complex__(self):
        return complex(self.item())

    def __bool__(self):
        if self.size != 1:
            raise ValueError("The truth value of an array with more than one element is ambiguous.")
        return bool(self.item())

    def __repr__(self):
        return repr(self.get())

    def __str__(self):
        return str(self.get())

    def __format__(self, spec):
        return format(self.item(), spec) if self.ndim == 0 else format(str(self), spec)

    # ---- views and indexing --------------------------------------------------------------
    def __len__(self):
        return len(self._a)

    def __iter__(self):
        if self.ndim == 0:
            raise TypeError("iteration over a 0-d array")
        return (self[i] for i in range(len(self)))

    def __getitem__(self, key):
        return call(operator.getitem, (self, key), {}, "ndarray.__getitem__", strict=False)

    __hash__ = None

    __add__, __radd__, __iadd__ = _binary(np.add), _binary(np.add, True), _inplace(np.add)
    __sub__, __rsub__, __isub__ = _binary(np.subtract), _binary(np.subtract, True), _inplace(np.subtract)
    __mul__, __rmul__, __imul__ = _binary(np.multiply), _binary(np.multiply, True), _inplace(np.multiply)
    __truediv__, __rtruediv__ = _binary(np.true_divide), _binary(np.true_divide, True)
    __itruediv__ = _inplace(np.true_divide)
    __floordiv__, __rfloordiv__ = _binary(np.floor_divide), _binary(np.floor_divide, True)
    __mod__, __rmod__ = _binary(np.remainder), _binary(np.remainder, True)
    __pow__, __rpow__, __ipow__ = _binary(np.power), _binary(np.power, True), _inplace(np.power)
    __matmul__, __rmatmul__ = _binary(np.matmul), _binary(np.matmul, True)
    __and__, __or__, __xor__ = _binary(np.bitwise_and), _binary(np.bitwise_or), _binary(np.bitwise_xor)
    __rand__, __ror__ = _binary(np.bitwise_and, True), _binary(np.bitwise_or, True)
    __lshift__, __rshift__ = _binary(np.left_shift), _binary(np.right_shift)
    __eq__, __ne__ = _binary(np.equal), _binary(np.not_equal)
    __lt__, __le__, __gt__, __ge__ = _binary(np.less), _binary(np.less_equal), _binary(np.greater), \
        _binary(np.greater_equal)
    __neg__, __pos__, __abs__, __invert__ = _unary(np.negative), _unary(np.positive), _unary(np.absolute), \
        _unary(np.invert)
