"""The three CUDA driver calls the copy-engine transports need, through ``ctypes`` (no build step).

* :class:`Copy2D`: ``cuMemcpy2DAsync`` -- a strided 2-D copy (rows of ``width`` bytes, each side
  with its own pitch) that the driver runs on a copy engine, between this GPU's memory and a
  peer's memory mapped into this process (symmetric memory). No SM is used, so it runs beside an
  attention kernel that fills every SM; and it packs/unpacks heads on the fly, so no copy kernel
  is needed either (``Tensor.copy_`` of a strided slice is a kernel, which gets no SM until a
  running attention kernel's last wave).
* :func:`write_flag` / :func:`wait_flag`: ``cuStreamWriteValue32`` / ``cuStreamWaitValue32`` --
  a stream writes a 32-bit value (after its earlier work, with a memory fence) or waits until one
  reaches a value, handled by the stream's front end: no kernel, so a wait queued beside a running
  kernel costs nothing and cannot be starved of SMs (the symmetric-memory barrier is a kernel).

Each acts on the current CUDA stream of the tensors' device, or on the stream whose raw handle
(``torch.cuda.Stream.cuda_stream``) is passed. :class:`Copy2D` prepares a copy into a fixed
destination from a fixed place of its source once and patches only the source address at each
call: a few microseconds of host time per copy instead of tens (the copies of a Ulysses call are
issued before its first kernel can start, so their host time is on the critical path). CUDA only.
"""

from __future__ import annotations

import ctypes
from types import SimpleNamespace

import torch

_MEMORYTYPE_DEVICE = 2
_WAIT_GEQ = 0  # (int32)(*addr - value) >= 0: wrap-safe "at least"
_WRITE_DEFAULT = 0  # the write is preceded by a memory fence


class _Memcpy2D(ctypes.Structure):
    _fields_ = [
        ("srcXInBytes", ctypes.c_size_t), ("srcY", ctypes.c_size_t), ("srcMemoryType", ctypes.c_int),
        ("srcHost", ctypes.c_void_p), ("srcDevice", ctypes.c_uint64), ("srcArray", ctypes.c_void_p),
        ("srcPitch", ctypes.c_size_t),
        ("dstXInBytes", ctypes.c_size_t), ("dstY", ctypes.c_size_t), ("dstMemoryType", ctypes.c_int),
        ("dstHost", ctypes.c_void_p), ("dstDevice", ctypes.c_uint64), ("dstArray", ctypes.c_void_p),
        ("dstPitch", ctypes.c_size_t),
        ("WidthInBytes", ctypes.c_size_t), ("Height", ctypes.c_size_t),
    ]


_DRIVER: SimpleNamespace | None = None


def _driver() -> SimpleNamespace:
    global _DRIVER
    if _DRIVER is None:
        try:
            lib = ctypes.CDLL("libcuda.so.1")
        except OSError as e:
            raise RuntimeError(f"the CUDA driver library libcuda.so.1 cannot be loaded: {e}") from None

        def fn(*names, args):
            for name in names:
                f = getattr(lib, name, None)
                if f is not None:
                    f.restype, f.argtypes = ctypes.c_int, args
                    return f
            raise RuntimeError(f"the CUDA driver has none of {names}")

        u32, stream, ptr = ctypes.c_uint32, ctypes.c_void_p, ctypes.c_uint64
        _DRIVER = SimpleNamespace(
            memcpy2d=fn("cuMemcpy2DAsync_v2", "cuMemcpy2DAsync", args=[ctypes.POINTER(_Memcpy2D), stream]),
            write=fn("cuStreamWriteValue32_v2", "cuStreamWriteValue32", args=[stream, ptr, u32, ctypes.c_uint]),
            wait=fn("cuStreamWaitValue32_v2", "cuStreamWaitValue32", args=[stream, ptr, u32, ctypes.c_uint]),
            error=fn("cuGetErrorString", args=[ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]),
        )
    return _DRIVER


def _check(rc: int, what: str) -> None:
    if rc != 0:
        msg = ctypes.c_char_p()
        _driver().error(rc, ctypes.byref(msg))
        raise RuntimeError(f"{what} failed: CUDA driver error {rc} ({(msg.value or b'?').decode()})")


def rows_layout(t: torch.Tensor) -> tuple[int, int, int]:
    """``(height, width_bytes, pitch_bytes)`` of a 2-D tensor whose rows are contiguous; raises otherwise.

    Args:
        t: ``[rows, cols]`` of any dtype with ``t.stride(1) == 1`` (or one column / one row).
    """
    if t.dim() != 2:
        raise ValueError(f"a 2-D copy needs 2-D views, got shape {tuple(t.shape)}")
    rows, cols = t.shape
    esz = t.element_size()
    if cols > 1 and t.stride(1) != 1:
        raise ValueError(f"a 2-D copy needs contiguous rows, got strides {t.stride()}")
    pitch = t.stride(0) * esz if rows > 1 else cols * esz
    if pitch < cols * esz:
        raise ValueError(f"rows overlap: pitch {pitch} < width {cols * esz} bytes")
    return rows, cols * esz, pitch


class Copy2D:
    """A 2-D copy-engine copy into a fixed destination from a fixed place of a source, prepared (and its
    bounds checked) once; each call names the source tensor.

    Args:
        dst: ``[R, W]`` CUDA tensor with contiguous rows (this GPU's memory or a peer's mapped here);
            kept alive by this object.
        offset: where the first row starts in the source, in elements.
        pitch: elements from one source row to the next (``>= W``).
        src_numel: the number of elements of the sources this copy will be called with.

    Calling ``copy(src, stream=None)`` copies the ``R`` rows of ``W`` elements that start ``offset``
    elements into the contiguous tensor ``src`` (dst's dtype, ``src_numel`` elements), ``pitch``
    elements apart, on the stream with raw handle ``stream`` (``None``: the current stream).
    """

    def __init__(self, dst: torch.Tensor, offset: int, pitch: int, src_numel: int):
        rows, width, dpitch = rows_layout(dst)
        self.dst, self.rows, self.cols, self.src_numel = dst, rows, dst.shape[1], src_numel
        self.dtype, self.esz = dst.dtype, dst.element_size()
        if rows and self.cols and (offset < 0 or pitch < self.cols or offset + (rows - 1) * pitch + self.cols > src_numel):
            raise ValueError(f"Copy2D: {rows} rows of {self.cols} from offset {offset}, pitch {pitch}, "
                             f"fall outside a source of {src_numel} elements")
        self.empty = rows == 0 or self.cols == 0
        self.offset_bytes = offset * self.esz
        self.params = _Memcpy2D(srcMemoryType=_MEMORYTYPE_DEVICE, dstMemoryType=_MEMORYTYPE_DEVICE, srcPitch=pitch * self.esz,
                                dstDevice=dst.data_ptr(), dstPitch=dpitch, WidthInBytes=width, Height=rows)
        self._ref = ctypes.byref(self.params)
        self._fn = _driver().memcpy2d

    def __call__(self, src: torch.Tensor, stream: int | None = None) -> None:
        if src.dtype != self.dtype or src.numel() != self.src_numel or not src.is_contiguous():
            raise ValueError(f"Copy2D: source must be a contiguous {self.dtype} tensor of {self.src_numel} elements, "
                             f"got {src.dtype}, {src.numel()} elements (contiguous: {src.is_contiguous()})")
        if self.empty:
            return
        self.params.srcDevice = src.data_ptr() + self.offset_bytes
        if stream is None:
            stream = torch.cuda.current_stream(self.dst.device).cuda_stream
        # the driver reads the parameters when the copy is queued: the struct may change afterwards
        rc = self._fn(self._ref, stream)
        if rc:
            _check(rc, f"cuMemcpy2DAsync ({self.rows} rows of {self.cols * self.esz} bytes)")


def write_flag(flag: torch.Tensor, value: int, stream: int | None = None) -> None:
    """The stream (handle ``stream``; ``None``: the current one) sets the int32 ``flag`` (one element; may be
    a peer's, mapped here) to ``value`` once its earlier work is done and visible."""
    if stream is None:
        stream = torch.cuda.current_stream(flag.device).cuda_stream
    _check(_driver().write(stream, flag.data_ptr(), value & 0xFFFFFFFF, _WRITE_DEFAULT), "cuStreamWriteValue32")


def wait_flag(flag: torch.Tensor, value: int, stream: int | None = None) -> None:
    """The stream (handle ``stream``; ``None``: the current one) waits (no kernel) until the int32 ``flag``
    (one element, this GPU's) is at least ``value``."""
    if stream is None:
        stream = torch.cuda.current_stream(flag.device).cuda_stream
    _check(_driver().wait(stream, flag.data_ptr(), value & 0xFFFFFFFF, _WAIT_GEQ), "cuStreamWaitValue32")
