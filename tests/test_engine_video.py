"""Video writers: mp4 / PNG folder / .npy, streaming, atomic (nothing half-written), report naming."""

from __future__ import annotations

import numpy as np
import pytest

from ditfleet.engine.errors import OutputError
from ditfleet.engine.video import (VideoWriter, check_output, file_stamp, output_kind, read_video, report_path,
                                   write_json_atomic)

F, H, W = 9, 32, 48


def frames(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (F, H, W, 3), dtype=np.uint8)


def leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".partial-" in p.name or ".old-" in p.name)


@pytest.mark.parametrize("name,kind", [("a.mp4", "mp4"), ("a.MP4", "mp4"), ("a.npy", "npy"), ("frames", "png"),
                                       ("out/frames/", "png")])
def test_output_kind(name, kind):
    assert output_kind(name) == kind


@pytest.mark.parametrize("name", ["a.avi", "a.gif", "a.png", "clip.mov", ""])
def test_bad_suffix_is_a_user_error(name):
    with pytest.raises(OutputError, match="mp4|empty"):
        output_kind(name)


def test_report_path_naming():
    assert report_path("out/a.mp4").as_posix() == "out/a.json"
    assert report_path("out/a.npy").as_posix() == "out/a.json"
    assert report_path("out/frames/").as_posix() == "out/frames.json"


@pytest.mark.parametrize("name", ["v.npy", "pngs"])
def test_lossless_outputs_round_trip_streamed_in_chunks(tmp_path, name):
    video = frames()
    target = tmp_path / "sub" / name
    with VideoWriter(target, F, H, W) as w:
        w.write(video[:1])  # the VAE's chunks: 1 frame, then 4 at a time
        for s in range(1, F, 4):
            assert not target.exists()  # only the partial exists while streaming
            w.write(video[s : s + 4])
    assert np.array_equal(read_video(target), video)
    assert leftovers(target.parent) == []


def test_mp4_has_every_frame(tmp_path):
    import imageio.v2 as imageio

    video = frames()
    target = tmp_path / "v.mp4"
    with VideoWriter(target, F, H, W, fps=16) as w:
        for f in video:
            w.write(f)
    reader = imageio.get_reader(str(target), "ffmpeg")
    got = [f for f in reader]
    assert reader.get_meta_data()["fps"] == 16
    reader.close()
    assert len(got) == F and got[0].shape == (H, W, 3)
    assert read_video(target).shape == (F, H, W, 3)


@pytest.mark.parametrize("name", ["v.mp4", "v.npy", "pngs"])
def test_failure_leaves_nothing_behind(tmp_path, name):
    target = tmp_path / name
    with pytest.raises(RuntimeError, match="decoder blew up"):
        with VideoWriter(target, F, H, W) as w:
            w.write(frames()[:5])
            raise RuntimeError("decoder blew up")
    assert list(tmp_path.iterdir()) == []


def test_incomplete_video_is_not_committed(tmp_path):
    w = VideoWriter(tmp_path / "v.npy", F, H, W)
    w.write(frames()[:3])
    with pytest.raises(RuntimeError, match="3 of 9"):
        w.commit()
    assert list(tmp_path.iterdir()) == []


def stamp_report(target) -> None:
    """What the engine writes beside a finished video: the report naming it (its size and time)."""
    write_json_atomic(report_path(target), {"ditfleet_version": "test", "output": str(target),
                                            "output_file": file_stamp(target) if target.is_file() else None})


@pytest.mark.parametrize("name", ["v.npy", "v.mp4"])
def test_replaces_its_own_older_output_atomically(tmp_path, name):
    target = tmp_path / name
    for seed in (1, 2):
        with VideoWriter(target, F, H, W) as w:
            w.write(frames(seed))
        stamp_report(target)
    if name.endswith(".npy"):
        assert np.array_equal(read_video(target), frames(2))
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("name", ["v.npy", "v.mp4"])
def test_refuses_a_file_it_did_not_write(tmp_path, name):
    target = tmp_path / name
    target.write_bytes(b"the user's own file")
    with pytest.raises(OutputError, match="was not written by ditfleet.*--overwrite"):
        VideoWriter(target, F, H, W)
    assert target.read_bytes() == b"the user's own file"
    stamp_report(target)  # a ditfleet report naming the file as it was ...
    target.write_bytes(b"replaced by the user after the run")  # ... does not cover what the user put there since
    with pytest.raises(OutputError, match="was not written by ditfleet"):
        VideoWriter(target, F, H, W)
    with VideoWriter(target, F, H, W, overwrite=True) as w:
        w.write(frames(3))
    assert read_video(target).shape == (F, H, W, 3)


def test_png_folder_must_be_new_or_empty_and_overwrite_keeps_other_files(tmp_path):
    target = tmp_path / "pngs"
    target.mkdir()
    with VideoWriter(target, F, H, W) as w:  # an empty folder is fine
        w.write(frames(1))
    (target / "notes.txt").write_text("mine")
    (target / "sub").mkdir()
    (target / "sub" / "00000.png").write_text("mine too")
    (target / "00020.png").write_text("stale frame of a longer video")
    with pytest.raises(OutputError, match="not empty.*--overwrite"):
        VideoWriter(target, F, H, W)
    with VideoWriter(target, F, H, W, overwrite=True) as w:
        w.write(frames(2))
    assert np.array_equal(read_video(target), frames(2))
    assert (target / "notes.txt").read_text() == "mine" and (target / "sub" / "00000.png").read_text() == "mine too"
    assert not (target / "00020.png").exists()
    assert leftovers(tmp_path) == []


def test_folder_names_with_a_dot(tmp_path):
    (tmp_path / "run.v2").mkdir()
    assert output_kind(tmp_path / "run.v2") == "png"
    assert output_kind(str(tmp_path / "new.v3") + "/") == "png"
    with pytest.raises(OutputError, match="end it with '/'"):
        output_kind(tmp_path / "new.v3")


def test_current_folder_as_output(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert output_kind(".") == "png"
    assert report_path(".") == tmp_path.parent / (tmp_path.name + ".json")
    with pytest.raises(OutputError, match="root folder"):
        check_output("/")


def test_abort_removes_the_folders_it_made(tmp_path):
    w = VideoWriter(tmp_path / "a" / "b" / "v.npy", F, H, W)
    w.write(frames()[:2])
    w.abort()
    assert list(tmp_path.iterdir()) == []


def test_wrong_existing_kind_is_a_user_error(tmp_path):
    (tmp_path / "x.mp4").mkdir()
    (tmp_path / "pngs").write_text("a file")
    with pytest.raises(OutputError, match="existing folder"):
        VideoWriter(tmp_path / "x.mp4", F, H, W)
    with pytest.raises(OutputError, match="existing file"):
        VideoWriter(tmp_path / "pngs", F, H, W)


def test_wrong_frame_shape_is_rejected(tmp_path):
    with VideoWriter(tmp_path / "v.npy", 1, H, W) as w:
        with pytest.raises(ValueError, match="uint8"):
            w.write(np.zeros((1, H, W, 3), np.float32))
        w.write(np.zeros((1, H, W, 3), np.uint8))


def test_json_report_written_atomically(tmp_path):
    p = write_json_atomic(tmp_path / "r.json", {"prompt": "猫", "n": 1})
    assert '"猫"' in p.read_text(encoding="utf-8")
    assert leftovers(tmp_path) == []


def test_mp4_without_imageio_ffmpeg_is_refused_before_any_work(tmp_path, monkeypatch):
    """A host without imageio-ffmpeg learns it at start-up (the check before denoising), not after the last step."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "imageio_ffmpeg" else real(name, *a))
    with pytest.raises(OutputError, match=r"needs the imageio-ffmpeg package.*\.npy file or a folder of PNGs"):
        check_output(tmp_path / "v.mp4")
    assert check_output(tmp_path / "v.npy")[1] == "npy" and not any(tmp_path.iterdir())
