"""Frame sources on real files: images and folders written with OpenCV, a short MJPG video."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge_agent.sources import (
    DirectorySource,
    FrameError,
    SourceEnded,
    SourceError,
    StreamSource,
    V4L2Source,
    EncodedImage,
    VideoFileSource,
    as_pixels,
    looks_whole,
    decode_image,
    open_source,
    redact_url,
)


def shade(value: int, size: tuple[int, int] = (48, 64)) -> np.ndarray:
    """A flat BGR image whose grey level identifies it after lossy encoding."""
    return np.full((*size, 3), value, dtype=np.uint8)


def level(image) -> int:
    """The grey level of a shade image, decoding it first if the source delivered it encoded."""
    return int(round(float(as_pixels(image).mean())))


def write_image(path: Path, value: int) -> Path:
    assert cv2.imwrite(str(path), shade(value))
    return path


def write_video(path: Path, values: list[int], fps: float = 10.0) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (64, 48))
    assert writer.isOpened()
    for v in values:
        writer.write(shade(v))
    writer.release()
    return path


def read_all(source: DirectorySource, reads: int = 10) -> list[int]:
    """Levels of every image the source delivers in `reads` reads (Nones dropped)."""
    out = []
    for _ in range(reads):
        image = source.read()
        if image is not None:
            out.append(level(image))
    return out


class FakeCapture:
    """Stands in for cv2.VideoCapture and records what the source asked for."""

    def __init__(self, target, api, params, opened=True):
        self.target, self.api, self.params, self.opened = target, api, params, opened
        self.props: dict[int, float] = {}
        self.released = False

    def isOpened(self):  # noqa: N802 - OpenCV's name
        return self.opened

    def set(self, prop, value):
        self.props[prop] = value
        return True

    def read(self):
        return True, shade(7)

    def release(self):
        self.released = True


# -- spec parsing ------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, device",
    [("0", 0), (" 2 ", 2), ("/dev/video1", "/dev/video1"), ("/dev/v4l/by-id/usb-cam", "/dev/v4l/by-id/usb-cam")],
)
def test_device_specs_give_v4l2_sources(spec, device):
    source = open_source(spec)
    assert isinstance(source, V4L2Source)
    assert source.device == device
    assert source.live


@pytest.mark.parametrize(
    "spec", ["rtsp://cam.local:554/stream1", "http://10.0.0.5/mjpg", "https://cam/x", "RTSP://cam/x"]
)
def test_url_specs_give_stream_sources(spec):
    source = open_source(spec, open_timeout_s=3)
    assert isinstance(source, StreamSource)
    assert source.live and source.open_timeout_s == 3


def test_stream_name_hides_the_password():
    source = open_source("rtsp://admin:s3cret@10.0.0.9:554/live")
    assert "s3cret" not in source.name
    assert source.name == "rtsp://admin:***@10.0.0.9:554/live"
    assert source.url.endswith("s3cret@10.0.0.9:554/live")  # still used to connect


def test_redact_url_leaves_urls_without_password_alone():
    assert redact_url("rtsp://cam/x") == "rtsp://cam/x"
    assert redact_url("rtsp://user@cam/x") == "rtsp://user@cam/x"


def test_folder_and_video_specs(tmp_path):
    video = write_video(tmp_path / "clip.avi", [10, 20])
    folder = tmp_path / "in"
    folder.mkdir()
    assert isinstance(open_source(str(folder), loop=True), DirectorySource)
    assert open_source(str(folder), loop=True).loop
    source = open_source(str(video), loop=True)
    assert isinstance(source, VideoFileSource) and source.loop and not source.live


@pytest.mark.parametrize("spec", ["", "   ", "ftp://host/file", "/no/such/thing.avi", "not-a-camera"])
def test_bad_specs_raise_source_error(spec):
    with pytest.raises(SourceError):
        open_source(spec)


def test_single_image_spec_says_to_use_a_folder(tmp_path):
    image = write_image(tmp_path / "one.png", 50)
    with pytest.raises(SourceError, match="folder"):
        open_source(str(image))


# -- cameras and streams -----------------------------------------------------


def test_v4l2_source_asks_for_v4l2_and_a_short_buffer():
    made: list[FakeCapture] = []

    def factory(target, api, params):
        made.append(FakeCapture(target, api, params))
        return made[-1]

    source = V4L2Source("/dev/video0", width=1280, height=720, fourcc="MJPG", capture_factory=factory)
    source.open()
    cap = made[0]
    assert (cap.target, cap.api) == ("/dev/video0", cv2.CAP_V4L2)
    assert cap.props[cv2.CAP_PROP_BUFFERSIZE] == 1
    assert cap.props[cv2.CAP_PROP_FRAME_WIDTH] == 1280
    assert source.read() is not None
    source.close()
    assert cap.released


def test_stream_source_sets_ffmpeg_timeouts():
    made: list[FakeCapture] = []

    def factory(target, api, params):
        made.append(FakeCapture(target, api, params))
        return made[-1]

    StreamSource("rtsp://cam/x", open_timeout_s=2, read_timeout_s=3, capture_factory=factory).open()
    params = dict(zip(made[0].params[::2], made[0].params[1::2]))
    assert made[0].api == cv2.CAP_FFMPEG
    assert params == {cv2.CAP_PROP_OPEN_TIMEOUT_MSEC: 2000, cv2.CAP_PROP_READ_TIMEOUT_MSEC: 3000}


def test_capture_that_does_not_open_raises_source_error():
    source = V4L2Source(3, capture_factory=lambda t, a, p: FakeCapture(t, a, p, opened=False))
    with pytest.raises(SourceError, match="v4l2:3: cannot open"):
        source.open()


def test_missing_real_camera_raises_source_error():
    with pytest.raises(SourceError, match="/dev/video99"):
        open_source("/dev/video99").open()


def test_unreachable_stream_raises_source_error():
    # Port 1 on localhost refuses at once, so this does not wait for the timeout.
    source = open_source("rtsp://user:pw@127.0.0.1:1/x", open_timeout_s=2)
    with pytest.raises(SourceError) as info:
        source.open()
    assert "pw" not in str(info.value)


def test_read_before_open_is_a_source_error():
    with pytest.raises(SourceError):
        V4L2Source(0, capture_factory=FakeCapture).read()


# -- video files -------------------------------------------------------------


def test_video_file_plays_once_then_ends(tmp_path):
    source = VideoFileSource(write_video(tmp_path / "clip.avi", [20, 60, 100, 140, 180]))
    source.open()
    levels = [level(source.read()) for _ in range(5)]
    assert levels == pytest.approx([20, 60, 100, 140, 180], abs=3)
    with pytest.raises(SourceEnded):
        source.read()
    source.close()


def test_video_file_loops_from_the_start(tmp_path):
    source = VideoFileSource(write_video(tmp_path / "clip.avi", [20, 60, 100]), loop=True)
    source.open()
    levels = [level(source.read()) for _ in range(8)]
    source.close()
    assert levels == pytest.approx([20, 60, 100, 20, 60, 100, 20, 60], abs=3)


def test_corrupt_video_file_raises_source_error(tmp_path):
    bad = tmp_path / "broken.avi"
    bad.write_bytes(os.urandom(2048))
    with pytest.raises(SourceError, match="broken.avi"):
        open_source(str(bad)).open()


# -- decoding ----------------------------------------------------------------


def test_decode_image_reports_empty_and_garbage():
    with pytest.raises(FrameError, match="empty"):
        decode_image(b"", "x.jpg")
    with pytest.raises(FrameError, match="not a readable image"):
        decode_image(b"definitely not a jpeg", "x.jpg")
    ok, png = cv2.imencode(".png", shade(90))
    with pytest.raises(FrameError):
        decode_image(png.tobytes()[: len(png) // 2], "half.png")
    assert level(decode_image(png.tobytes())) == 90


# -- folders -----------------------------------------------------------------


def test_folder_reads_existing_files_in_name_order_once(tmp_path):
    for name, value in [("b.png", 20), ("a.jpg", 10), ("c.bmp", 30), ("notes.txt", 0), (".hidden.png", 99)]:
        if name.endswith(".txt"):
            (tmp_path / name).write_text("ignore me")
        else:
            write_image(tmp_path / name, value)
    source = DirectorySource(tmp_path)
    source.open()
    assert read_all(source) == pytest.approx([10, 20, 30], abs=3)
    assert source.read() is None


def test_folder_picks_up_each_new_file_once(tmp_path):
    source = DirectorySource(tmp_path)
    source.open()
    assert read_all(source, 3) == []
    write_image(tmp_path / "0001.png", 40)
    write_image(tmp_path / "0002.png", 80)
    assert read_all(source, 5) == [40, 80]
    write_image(tmp_path / "0003.png", 120)
    assert read_all(source, 5) == [120]
    assert read_all(source, 5) == []


def test_folder_waits_until_a_file_stops_growing(tmp_path):
    ok, png = cv2.imencode(".png", shade(70))
    data = png.tobytes()
    source = DirectorySource(tmp_path)
    source.open()
    target = tmp_path / "scan.png"
    target.write_bytes(data[: len(data) // 2])  # the scanner is still writing
    assert source.read() is None
    with target.open("ab") as fh:
        fh.write(data[len(data) // 2 :])
    assert read_all(source, 3) == [70]
    assert source.bad_files == 0


def test_corrupt_and_empty_files_are_reported_and_skipped(tmp_path, caplog):
    write_image(tmp_path / "1.png", 10)
    (tmp_path / "2.jpg").write_bytes(b"")
    (tmp_path / "3.jpg").write_bytes(os.urandom(500))
    write_image(tmp_path / "4.png", 40)
    source = DirectorySource(tmp_path)
    source.open()
    with caplog.at_level("ERROR", logger="edge_agent.sources"):
        assert read_all(source, 5) == [10, 40]
    assert source.bad_files == 2
    assert "3.jpg" in (source.last_bad or "")
    assert sum("skipping unreadable image" in r.message for r in caplog.records) == 2
    assert read_all(source, 3) == []  # reported once, not retried forever


def test_bad_file_is_retried_once_it_is_replaced(tmp_path):
    (tmp_path / "x.png").write_bytes(b"garbage")
    source = DirectorySource(tmp_path)
    source.open()
    assert read_all(source, 2) == []
    write_image(tmp_path / "x.png", 55)
    assert read_all(source, 3) == [55]


def test_overwritten_file_is_read_again(tmp_path):
    target = write_image(tmp_path / "latest.png", 30)
    source = DirectorySource(tmp_path)
    source.open()
    assert read_all(source, 2) == [30]
    staged = write_image(tmp_path / "tmp.png", 90)
    os.utime(staged, ns=(1_000_000_000, 1_000_000_000))  # same size and even an older mtime
    read_all(source, 3)
    os.replace(staged, target)  # a camera replacing latest.png atomically
    assert read_all(source, 3) == [90]


def test_include_existing_false_skips_what_was_there(tmp_path):
    write_image(tmp_path / "old.png", 10)
    source = DirectorySource(tmp_path, include_existing=False)
    source.open()
    assert read_all(source, 2) == []
    write_image(tmp_path / "new.png", 200)
    assert read_all(source, 3) == [200]


def test_mtime_order(tmp_path):
    write_image(tmp_path / "z.png", 10)
    write_image(tmp_path / "a.png", 20)
    os.utime(tmp_path / "z.png", ns=(1_000_000_000, 1_000_000_000))
    os.utime(tmp_path / "a.png", ns=(2_000_000_000, 2_000_000_000))
    source = DirectorySource(tmp_path, order="mtime")
    source.open()
    assert read_all(source, 3) == [10, 20]


def test_loop_replays_the_folder_and_still_takes_new_files_first(tmp_path):
    write_image(tmp_path / "a.png", 10)
    write_image(tmp_path / "b.png", 20)
    (tmp_path / "c.png").write_bytes(b"bad")
    source = DirectorySource(tmp_path, loop=True)
    source.open()
    assert read_all(source, 5) == [10, 20, 10, 20, 10]
    write_image(tmp_path / "c2.png", 30)
    first_after_new = read_all(source, 2)
    assert 30 in first_after_new
    assert source.bad_files == 1  # the bad file is not replayed (or re-reported)


def test_frames_per_image_holds_each_image_like_a_still_envelope(tmp_path):
    write_image(tmp_path / "a.png", 10)
    write_image(tmp_path / "b.png", 20)
    source = open_source(str(tmp_path), loop=True, frames_per_image=3)
    source.open()
    assert read_all(source, 8) == [10, 10, 10, 20, 20, 20, 10, 10]
    with pytest.raises(ValueError):
        DirectorySource(tmp_path, frames_per_image=0)


def test_missing_folder_cannot_open(tmp_path):
    with pytest.raises(SourceError, match="does not exist"):
        DirectorySource(tmp_path / "nope").open()


def test_folder_that_disappears_raises_then_reopens(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    write_image(folder / "1.png", 10)
    source = DirectorySource(folder)
    source.open()
    assert read_all(source, 2) == [10]
    shutil.rmtree(folder)
    with pytest.raises(SourceError, match="disappeared"):
        source.read()
    source.close()
    with pytest.raises(SourceError):
        source.open()
    folder.mkdir()
    write_image(folder / "2.png", 20)
    source.open()
    assert read_all(source, 3) == [20]


def test_folder_frames_stay_encoded_until_asked_for(tmp_path):
    write_image(tmp_path / "a.jpg", 80)
    source = DirectorySource(tmp_path)
    source.open()
    image = source.read()
    assert isinstance(image, EncodedImage) and not image.decoded
    assert image.data == (tmp_path / "a.jpg").read_bytes()
    import hashlib
    assert image.sha256 == hashlib.sha256(image.data).hexdigest()  # sha256sum of the file
    colour = image.decode()
    assert colour.shape == (48, 64, 3) and not colour.flags.writeable
    assert image.decode() is colour  # decoded once, kept
    grey = image.decode(grey=True)
    assert grey.shape == (48, 64) and level(grey) == 80


def test_grey_is_decoded_straight_from_the_bytes_when_colour_was_never_needed(tmp_path):
    write_image(tmp_path / "a.png", 120)
    source = DirectorySource(tmp_path)
    source.open()
    image = source.read()
    grey = image.decode(grey=True)
    assert grey.ndim == 2 and level(grey) == 120 and image._colour is None  # noqa: SLF001


def test_truncated_jpeg_and_png_are_refused_when_read_not_when_decoded(tmp_path):
    good = cv2.imencode(".jpg", shade(50))[1].tobytes()
    png = cv2.imencode(".png", shade(60))[1].tobytes()
    assert looks_whole(good) and looks_whole(png)
    assert looks_whole(good[:-100]) is False and looks_whole(png[:-20]) is False
    assert looks_whole(b"BM" + b"\0" * 60) is None  # another format: decoded to find out
    (tmp_path / "1.jpg").write_bytes(good[: len(good) // 2])
    (tmp_path / "2.png").write_bytes(png[:-20])
    (tmp_path / "3.jpg").write_bytes(good)
    source = DirectorySource(tmp_path)
    source.open()
    assert read_all(source, 4) == [50]
    assert source.bad_files == 2


def test_lazy_off_delivers_decoded_pixels(tmp_path):
    write_image(tmp_path / "a.png", 30)
    source = open_source(str(tmp_path), lazy=False)
    source.open()
    image = source.read()
    assert isinstance(image, np.ndarray) and level(image) == 30
