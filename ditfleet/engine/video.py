"""Video writers: mp4 (H.264 through imageio-ffmpeg), a folder of PNGs, or one ``.npy`` uint8 array.

The kind is chosen by the output path: ``*.mp4``; ``*.npy`` (``uint8 [F, H, W, 3]``, written
through a memory map so frames stream to disk); a path without a suffix, ending in ``/``, or naming an existing folder
is a folder of ``00000.png, 00001.png, ...``. PNG and NPY are lossless: use them for
post-processing and exact comparisons.

Every writer is atomic and streaming: frames are appended as the VAE decodes them, into a
temporary name beside the target (``.<name>.partial-<pid>...``); :meth:`VideoWriter.commit`
checks the frame count and renames it into place, and :meth:`VideoWriter.abort` (or leaving the
``with`` block by an exception) removes it, so a failed or interrupted run leaves nothing
half-written.

Outputs never destroy what ditfleet did not write (:func:`check_output`, called before any work):
an existing video file is replaced only when the ditfleet report beside it names it (size and
time), a PNG folder must be new or empty, and a foreign report is never overwritten -- unless
``overwrite`` is given, and even then a PNG folder keeps every file that is not a frame file.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np

from .errors import OutputError

VIDEO_SUFFIXES = {".mp4": "mp4", ".npy": "npy"}
DEFAULT_FPS = 16
MP4_QUALITY = 8  # imageio's scale 0..10, as the official Wan save_video


FRAME_NAME = re.compile(r"^(\d{5})\.png$")  # ditfleet's PNG frame files: 00000.png, 00001.png, ...


def _target(path: str | os.PathLike) -> Path:
    """The output path without a trailing separator, absolute when it names the current folder (``.``)."""
    text = os.fspath(path).strip()
    if not text:
        raise OutputError("output: empty path; give e.g. out.mp4, out.npy, or a folder name for PNG frames")
    p = Path(text.rstrip("/" + os.sep) or os.sep)
    if not p.name or p.name in (".", ".."):
        p = Path(os.path.abspath(p))
    if not p.name:
        raise OutputError(f"output {text!r}: the root folder cannot be an output; name a file or a folder in it")
    return p


def output_kind(path: str | os.PathLike) -> str:
    """``"mp4"``, ``"npy"`` or ``"png"`` (a folder) for ``path``; raises :class:`OutputError` otherwise.

    A folder of PNG frames is a path ending in ``/``, a path without a suffix, or an existing folder whose
    suffix is not a video suffix (so a folder named ``run.v2`` works when it exists or is written ``run.v2/``).
    """
    text = os.fspath(path).strip()
    p = _target(path)
    kind = VIDEO_SUFFIXES.get(p.suffix.lower())
    if text.endswith(("/", os.sep)) or not p.suffix or (kind is None and p.is_dir()):
        return "png"
    if kind is None:
        raise OutputError(
            f"output {text!r}: unsupported suffix {p.suffix!r}; valid: .mp4 (H.264 video), .npy (uint8 [F, H, W, 3]) "
            f"or a folder for lossless PNG frames (a name without a suffix, or end it with '/': {text.rstrip('/')}/)"
        )
    return kind


def report_path(path: str | os.PathLike) -> Path:
    """Where the JSON report of ``path`` goes: ``out.mp4`` -> ``out.json``, folder ``frames/`` -> ``frames.json``."""
    p = _target(path)
    folder = os.fspath(path).strip().endswith(("/", os.sep)) or not p.suffix or p.is_dir()
    return p.with_name(p.name + ".json") if folder else p.with_suffix(".json")


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


def file_stamp(path: Path) -> dict:
    """Size and modification time of a file ditfleet wrote (kept in its report: how a re-run knows it may replace it)."""
    st = path.stat()
    return {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def _read_report(rp: Path) -> dict | None:
    """The ditfleet report in file ``rp``, or ``None`` when it is missing or not a ditfleet report."""
    try:
        data = json.loads(rp.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and "ditfleet_version" in data else None


def _report_of(target: Path) -> dict | None:
    return _read_report(report_path(target))


def written_by_ditfleet(target: Path) -> bool:
    """True when ``target`` is a file whose ditfleet report (beside it) names it with its current size and time."""
    rep = _report_of(target)
    if rep is None or not target.is_file() or not rep.get("output"):
        return False
    same = Path(str(rep["output"])).name == target.name  # the report sits beside it; the path it gives may be relative
    return same and rep.get("output_file") == file_stamp(target)


def check_output(path: str | os.PathLike, *, overwrite: bool = False) -> tuple[Path, str]:
    """Validate an output path before any work; nothing is touched.

    Refused (:class:`OutputError`, naming the path): a bad suffix; the wrong kind of existing thing; a folder
    that cannot be created; an existing non-empty PNG folder, an existing video file or report that ditfleet
    did not write -- unless ``overwrite`` (then a PNG folder keeps every file that is not one of ditfleet's
    frame files). A video and report that an earlier ditfleet run wrote (its report names the video with its
    size and time) may be replaced.

    Returns:
        ``(path, kind)``.
    """
    kind = output_kind(path)
    target = _target(path)
    if kind == "mp4" and importlib.util.find_spec("imageio_ffmpeg") is None:
        raise OutputError(f"output {str(target)!r}: writing .mp4 needs the imageio-ffmpeg package, which is not installed "
                          "(pip install imageio-ffmpeg); or write lossless frames: a .npy file or a folder of PNGs")
    if kind == "png" and target.is_file():
        raise OutputError(f"output {str(target)!r} is an existing file, but a path without suffix means a folder of PNGs")
    if kind != "png" and target.is_dir():
        raise OutputError(f"output {str(target)!r} is an existing folder, cannot write a .{kind} file there")
    _check_parent(target, "output")
    if not overwrite:
        if kind == "png" and target.is_dir() and any(target.iterdir()):
            n = sum(1 for _ in target.iterdir())
            raise OutputError(f"output folder {str(target)!r} is not empty ({n} entries); ditfleet writes PNG frames only "
                              "into a new or empty folder: name another one, or give --overwrite to replace its frame "
                              "files NNNNN.png (its other files are kept)")
        if kind != "png" and target.exists() and not written_by_ditfleet(target):
            raise OutputError(f"output {str(target)!r} exists and was not written by ditfleet (no report of it beside "
                              "it); name another file, or give --overwrite to replace it")
    rp = report_path(target)
    if rp.is_dir():
        raise OutputError(f"report {str(rp)!r} (the JSON beside the output) is an existing folder; name another output")
    if rp.exists() and not overwrite and _read_report(rp) is None:
        raise OutputError(f"report {str(rp)!r} (the JSON beside the output) exists and is not a ditfleet report; name "
                          "another output, or give --overwrite to replace it")
    return target, kind


def check_file_output(path: str | os.PathLike, what: str, *, overwrite: bool = False) -> Path:
    """Check a plain output file (``--save-latents``) before any work: its folder can be made, it is not a folder,
    and it does not exist unless ``overwrite``. Returns the path."""
    target = Path(os.fspath(path))
    if not os.fspath(path).strip():
        raise OutputError(f"{what}: empty path")
    if target.is_dir():
        raise OutputError(f"{what} {str(target)!r} is an existing folder; give a file name")
    if target.exists() and not overwrite:
        raise OutputError(f"{what} {str(target)!r} exists; name another file, or give --overwrite to replace it")
    _check_parent(target, what)
    return target


def _check_parent(target: Path, what: str) -> None:
    """``target``'s folder exists or can be made (its nearest existing ancestor is a writable folder)."""
    ancestor = target.parent.absolute()
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputError(f"{what} {str(target)!r}: cannot create its folder ({str(ancestor)!r} is a file)")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputError(f"{what} {str(target)!r}: cannot write into {str(ancestor)!r} (permission denied)")


class VideoWriter:
    """Streams uint8 frames ``[n, H, W, 3]`` to one output, atomically.

    Args:
        path: target (``.mp4``, ``.npy``, or a folder for PNGs).
        num_frames: frames that will be written (checked at :meth:`commit`; sizes the ``.npy``).
        height, width: frame size in pixels.
        fps: frame rate of an mp4 (ignored for PNG / NPY).
        overwrite: allow replacing what :func:`check_output` protects (a non-empty PNG folder keeps its other files).
    """

    def __init__(self, path: str | os.PathLike, num_frames: int, height: int, width: int, fps: int = DEFAULT_FPS,
                 *, overwrite: bool = False):
        self.target, self.kind = check_output(path, overwrite=overwrite)
        self.num_frames, self.height, self.width, self.fps = num_frames, height, width, fps
        self.written = 0
        self.done = False
        self._made = self.target.parent.absolute()  # the top folder this writer creates (removed again on abort)
        while not self._made.parent.exists():
            self._made = self._made.parent
        self._made = None if self._made.exists() else self._made
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
                self._merge_frames()
            else:
                os.replace(self.partial, self.target)
        except BaseException:
            self.abort()
            raise
        self.done = True
        return self.target

    def _merge_frames(self) -> None:
        """Into an existing folder (empty, or ``overwrite``): each frame file is renamed over its namesake, and
        ditfleet frame files of an earlier, longer video are removed; no other file is touched."""
        for f in sorted(self.partial.iterdir()):
            os.replace(f, self.target / f.name)
        for f in self.target.iterdir():
            m = FRAME_NAME.match(f.name)
            if m and int(m.group(1)) >= self.num_frames and f.is_file():
                f.unlink()
        self.partial.rmdir()

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
        if self._made is not None:  # folders made for this output, if nothing else was put there meanwhile
            d = self.target.parent.absolute()
            while True:
                try:
                    d.rmdir()
                except OSError:
                    break
                if d == self._made:
                    break
                d = d.parent
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
