"""Caller memory handed to the library: float32, contiguous, in CPU memory, given as an address
and a length in floats. torch tensors and numpy arrays are both accepted, neither imported."""

from __future__ import annotations


def float_buffer(x, name: str) -> tuple[int, int]:
    """(address, number of floats) of a torch tensor or numpy array the library may read or
    write; a clear ValueError for anything it cannot."""
    if hasattr(x, "data_ptr"):  # torch.Tensor
        if str(x.dtype) != "torch.float32" or x.device.type != "cpu" or not x.is_contiguous():
            raise ValueError(
                f"qwenclip: {name} must be a contiguous float32 CPU tensor, got {x.dtype} on "
                f"{x.device}{'' if x.is_contiguous() else ' (not contiguous)'}"
            )
        return x.data_ptr(), x.numel()
    if hasattr(x, "__array_interface__"):  # numpy.ndarray
        if str(x.dtype) != "float32" or not x.flags["C_CONTIGUOUS"]:
            raise ValueError(f"qwenclip: {name} must be a C-contiguous float32 array, got {x.dtype}")
        return x.ctypes.data, x.size
    raise ValueError(f"qwenclip: {name} must be a torch tensor or a numpy array, got {type(x).__name__}")


def empty(shape: tuple[int, ...], output: str):
    """An uninitialised float32 buffer for the library to fill: "torch" or "numpy"."""
    if output == "torch":
        import torch

        return torch.empty(shape, dtype=torch.float32)
    if output == "numpy":
        import numpy as np

        return np.empty(shape, dtype=np.float32)
    raise ValueError(f'qwenclip: output must be "torch" or "numpy", got {output!r}')
