"""CuPy's cupy.cuda.nvrtc for the stand-in (kernels are built by gpucnn's emulator, not NVRTC)."""


def getVersion():
    return (13, 0)
