"""Video writers: mp4 (H.264 through imageio-ffmpeg), a folder of PNGs, or one ``.npy`` uint8 array.

The kind is chosen by the output path: ``*.mp4``; ``*.npy`` (``uint8 [F, H, W, 3]``, written
through a memory map so frames stream to disk); a path without a suffix (or ending in ``/``) is
a folder of ``00000.png, 00001.png, ...``. PNG and NPY are lossless: use them for post-processing
and exact comparisons.

Every writer is atomic and streaming: frames are appended as the VAE decodes them, into a
temporary name beside the target (``.<name>.partial-<pid>...``); :meth:`VideoWriter.commit`
checks the frame count and renames it into place (replacing an older result), and
:meth:`VideoWriter.abort` (or leaving the ``with`` block by an exception) removes it, so a
failed or interrupted run leaves nothing half-written.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from .errors import OutputError

VIDEO_SUFFIXES = {".mp4": "mp4", ".npy": "npy"}
DEFAULT_FPS = 16
MP4_QUALITY = 8  # imageio's scale 0..10, as the official Wan save_video


def output_kind(path: str | os.PathLike) -> str:
    """``"mp4"``, ``"npy"`` or ``"png"`` (a folder) for ``path``; raises :class:`OutputError` otherwise."""
    text = os.fspath(path)
    if not text.strip():
        raise OutputError("output: empty path; give e.g. out.mp4, out.npy, or a folder name for PNG frames")
    p = Path(text)
    if text.endswith(("/", os.sep)) or not p.suffix:
        return "png"
    kind = VIDEO_SUFFIXES.get(p.suffix.lower())
    if kind is None:
        raise OutputError(
            f"output {text!r}: unsupported suffix {p.suffix!r}; valid: .mp4 (H.264 video), .npy (uint8 [F, H, W, 3]) "
            "or a folder name without a suffix (lossless PNG frames)"
        )
    return kind


def report_path(path: str | os.PathLike) -> Path:
    """Where the JSON report of ``path`` goes: ``out.mp4`` -> ``out.json``, folder ``frames/`` -> ``frames.json``."""
    p = Path(os.fspath(path).rstrip("/" + os.sep))
    return p.with_suffix(".json") if p.suffix else p.with_name(p.name + ".json")


def _partial(target: Path, kind: str) -> Path:
    suffix = "" if kind == "png" else target.suffix
    stem = target.name if kind == "png" else target.stem
    return target.with_name(f".{stem}.partial-{os.getpid()}{suffix}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def check_output(path: str | os.PathLike) -> tuple[Path, str]:
    """Validate an output path before any work: suffix, and that it is not the wrong kind of existing thing.

    Returns:
        ``(path, kind)``.
    """
    kind = output_kind(path)
    target = Path(os.fspath(path).rstrip("/" + os.sep) or ".")
    if kind == "png" and target.is_file():
        raise OutputError(f"output {str(target)!r} is an existing file, but a path without suffix means a folder of PNGs")
    if kind != "png" and target.is_dir():
        raise OutputError(f"output {str(target)!r} is an existing folder, cannot write a .{kind} file there")
    ancestor = target.parent.absolute()
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputError(f"output {str(target)!r}: cannot create its folder ({str(ancestor)!r} is a file)")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputError(f"output {str(target)!r}: cannot write into {str(ancestor)!r} (permission denied)")
    return target, kind


class VideoWriter:
    """Streams uint8 frames ``[n, H, W, 3]`` to one output, atomically.

    Args:
        path: target (``.mp4``, ``.npy``, or a folder for PNGs).
        num_frames: frames that will be written (checked at :meth:`commit`; sizes the ``.npy``).
        height, width: frame size in pixels.
        fps: frame rate of an mp4 (ignored for PNG / NPY).
    """

    def __init__(self, path: str | os.PathLike, num_frames: int, height: int, width: int, fps: int = DEFAULT_FPS):
        self.target, self.kind = check_output(path)
        self.num_frames, self.height, self.width, self.fps = num_frames, height, width, fps
        self.written = 0
        self.done = False
        try:
            self.target.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputError(f"output {str(self.target)!r}: cannot create its folder ({e.strerror})") from None
        self.partial = _partial(self.target, self.kind)
        _remove(self.partial)
        self._gen = None
        self._arr = None
        try:
            if self.kind == "png":
                self.partial.mkdir()
            elif self.kind == "npy":
                self._arr = np.lib.format.open_memmap(
                    self.partial, mode="w+", dtype=np.uint8, shape=(num_frames, height, width, 3)
                )
            else:
                import imageio_ffmpeg

                self._gen = imageio_ffmpeg.write_frames(
                    str(self.partial), (width, height), fps=fps, quality=MP4_QUALITY, codec="libx264",
                    macro_block_size=16, ffmpeg_log_level="error",
                )
                self._gen.send(None)
        except OSError as e:
            self.abort()
            raise OutputError(f"output {str(self.target)!r}: cannot write ({e.strerror or e})") from None

    # ---- streaming ---------------------------------------------------------------------------
    def write(self, frames: np.ndarray) -> None:
        """Append frames: uint8 ``[n, H, W, 3]`` (or one ``[H, W, 3]``)."""
        frames = np.asarray(frames)
        if frames.ndim == 3:
            frames = frames[None]
        n = frames.shape[0]
        if frames.dtype != np.uint8 or frames.shape[1:] != (self.height, self.width, 3):
            raise ValueError(f"expected uint8 frames [n, {self.height}, {self.width}, 3], got {frames.dtype} {list(frames.shape)}")
        if self.written + n > self.num_frames:
            raise ValueError(f"writer expects {self.num_frames} frames, got {self.written + n}")
        if self.kind == "png":
            from PIL import Image

            for k in range(n):
                Image.fromarray(frames[k]).save(self.partial / f"{self.written + k:05d}.png")
        elif self.kind == "npy":
            self._arr[self.written : self.written + n] = frames
        else:
            for k in range(n):
                self._gen.send(np.ascontiguousarray(frames[k]))
        self.written += n

    def commit(self) -> Path:
        """Finish and rename into place (replacing an older output). Returns the final path."""
        if self.done:
            return self.target
        if self.written != self.num_frames:
            self.abort()
            raise RuntimeError(f"video incomplete: {self.written} of {self.num_frames} frames written")
        try:
            if self.kind == "npy":
                self._arr.flush()
                del self._arr
                self._arr = None
            elif self.kind == "mp4":
                self._gen.close()
                self._gen = None
            if self.kind == "png" and self.target.exists():
                old = self.target.with_name(f".{self.target.name}.old-{os.getpid()}")
                os.replace(self.target, old)
                os.replace(self.partial, self.target)
                _remove(old)
            else:
                os.replace(self.partial, self.target)
        except BaseException:
            self.abort()
            raise
        self.done = True
        return self.target

    def abort(self) -> None:
        """Drop everything written (idempotent)."""
        if self._gen is not None:
            try:
                self._gen.close()
            except Exception:  # noqa: BLE001 - ffmpeg may already be gone; the file is removed anyway
                pass
            self._gen = None
        self._arr = None
        _remove(self.partial)
        self.done = True

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        else:
            self.commit()


def write_json_atomic(path: str | os.PathLike, data: dict) -> Path:
    """Write ``data`` as indented JSON to ``path`` through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(data, indent=2, default=str, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise
    return path


def read_video(path: str | os.PathLike) -> np.ndarray:
    """Read back an output as uint8 ``[F, H, W, 3]`` (mp4 through imageio-ffmpeg; tests and comparisons)."""
    target, kind = Path(os.fspath(path).rstrip("/")), output_kind(path)
    if kind == "npy":
        return np.load(target)
    if kind == "png":
        from PIL import Image

        return np.stack([np.asarray(Image.open(p).convert("RGB")) for p in sorted(target.glob("*.png"))])
    import imageio_ffmpeg

    gen = imageio_ffmpeg.read_frames(str(target))
    meta = gen.__next__()
    w, h = meta["size"]
    frames = [np.frombuffer(f, dtype=np.uint8).reshape(h, w, 3) for f in gen]
    return np.stack(frames) if frames else np.zeros((0, h, w, 3), np.uint8)
