"""CuPy's cupy.cuda.nccl as cupy-cuda13x ships it without the NCCL library: ``available`` is False and
nothing else is there. A test that needs NCCL monkeypatches what it uses onto this module."""

available = False
