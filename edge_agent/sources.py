"""Frame sources: V4L2 cameras, network streams, video files and watched image folders.

Every source follows the ``FrameSource`` protocol (``name``, ``open``, ``read``,
``close``) and adds ``live``: True for cameras and streams (read them as fast as
they deliver; a missing frame means trouble), False for files and folders (the
grabber paces them; ``read`` returning None from a folder just means "nothing
new yet"). Sources are used from one thread only (the grabber's); OpenCV
captures are not thread-safe.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import cv2
import numpy as np

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".pgm", ".ppm")
STREAM_SCHEMES = ("rtsp", "rtsps", "http", "https")
DEFAULT_MAX_FILE_BYTES = 50 * 1024 * 1024

# cv2.VideoCapture(source, api_preference, params) -> capture; injectable so tests
# can check what we ask OpenCV for without a real camera.
CaptureFactory = Callable[..., Any]


class SourceError(Exception):
    """A frame source cannot be opened or stopped working; the message says which and why."""


class SourceEnded(SourceError):
    """A finite source (a video file without looping) has delivered its last frame."""


class FrameError(Exception):
    """One image could not be decoded (empty, corrupt, truncated or not an image)."""


def decode_image(data: bytes, what: str = "image") -> np.ndarray:
    """Decode encoded image bytes to a BGR uint8 array, or raise FrameError saying why."""
    if not data:
        raise FrameError(f"{what}: file is empty")
    return _decode(data, cv2.IMREAD_COLOR, what)


# Magic numbers of the formats a folder camera writes; files that start otherwise are decoded
# at once to find out whether OpenCV can read them at all.
_JPEG_START, _JPEG_END = b"\xff\xd8\xff", b"\xff\xd9"
_PNG_START, _PNG_END = b"\x89PNG\r\n\x1a\n", b"IEND"


def looks_whole(data: bytes) -> bool | None:
    """Whether encoded bytes look like one complete JPEG or PNG (True/False); None for other formats.

    A cheap check on the first and last bytes, so a frame can be kept encoded and decoded only
    when an item needs it: an empty, truncated or foreign file is still refused when it is read.
    """
    if data.startswith(_JPEG_START):
        # Cameras and encoders may pad after the end-of-image marker; look at the last few bytes.
        return _JPEG_END in data[-32:]
    if data.startswith(_PNG_START):
        return len(data) > 57 and _PNG_END in data[-16:]  # signature, IHDR and IEND at least
    return None


class EncodedImage:
    """One image as the camera or folder delivered it (JPEG, PNG, ... bytes), decoded only on demand.

    Each decode (colour, or straight to grey) is done at most once and kept, read-only, for
    every consumer; ``sha256`` is the hash of the bytes (``sha256sum`` of the file). Thread-safe.
    ``captured_at`` (wall-clock seconds) is set by a source that knows when its camera took the
    image; the grabber then stamps the frame with it instead of the moment it was read.
    """

    __slots__ = ("data", "what", "captured_at", "_colour", "_grey", "_sha256", "_lock")

    def __init__(self, data: bytes, what: str = "image", captured_at: float | None = None) -> None:
        self.data = bytes(data)
        self.what = what
        self.captured_at = captured_at
        self._colour: np.ndarray | None = None
        self._grey: np.ndarray | None = None
        self._sha256: str | None = None
        self._lock = threading.Lock()

    @property
    def sha256(self) -> str:
        """Hex SHA-256 of the encoded bytes."""
        if self._sha256 is None:
            self._sha256 = hashlib.sha256(self.data).hexdigest()
        return self._sha256

    @property
    def decoded(self) -> bool:
        return self._colour is not None or self._grey is not None

    def decode(self, grey: bool = False) -> np.ndarray:
        """The pixels: BGR (or grey for a grey image file), or straight to grey; raises FrameError."""
        with self._lock:
            if grey:
                if self._grey is None:
                    if self._colour is not None:
                        self._grey = _readonly(_grey_of(self._colour))
                    else:
                        self._grey = _readonly(_decode(self.data, cv2.IMREAD_GRAYSCALE, self.what))
                return self._grey
            if self._colour is None:
                self._colour = _readonly(decode_image(self.data, self.what))
            return self._colour

    def __len__(self) -> int:
        return len(self.data)

    def __repr__(self) -> str:
        return f"EncodedImage({self.what!r}, {len(self.data)} bytes)"


def _decode(data: bytes, flags: int, what: str) -> np.ndarray:
    if not data:
        raise FrameError(f"{what}: file is empty")
    image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), flags)
    if image is None or image.size == 0:
        raise FrameError(f"{what}: not a readable image (corrupt, truncated or unsupported format)")
    return image


def _grey_of(image: np.ndarray) -> np.ndarray:
    if image.ndim == 2:
        return image
    return cv2.cvtColor(image, cv2.COLOR_BGRA2GRAY if image.shape[2] == 4 else cv2.COLOR_BGR2GRAY)


def _readonly(image: np.ndarray) -> np.ndarray:
    # Shared by every consumer (scene detector, reader, crops): an in-place edit would corrupt the others.
    image.flags.writeable = False
    return image


def as_pixels(image: np.ndarray | EncodedImage) -> np.ndarray:
    """Pixels of what a source's ``read`` returned: decoded (and kept) if it came encoded."""
    return image.decode() if isinstance(image, EncodedImage) else image


def redact_url(url: str) -> str:
    """The URL with any password replaced by ***, safe to log and show on the status page."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    netloc = f"{parts.username}:***@{host}" if parts.username else f"***@{host}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


class _CaptureSource:
    """Shared open/read/close over cv2.VideoCapture; subclasses say what to open and how."""

    name: str
    live: bool

    def __init__(self, capture_factory: CaptureFactory | None) -> None:
        self._factory: CaptureFactory = capture_factory or cv2.VideoCapture
        self._cap: Any = None

    def _target(self) -> int | str:
        raise NotImplementedError

    def _api(self) -> int:
        raise NotImplementedError

    def _params(self) -> list[int]:
        return []

    def _configure(self, cap: Any) -> None:
        """Set capture properties after opening (resolution, buffers); default none."""

    def _open_hint(self) -> str:
        return ""

    def open(self) -> None:
        """Open the capture; raise SourceError if OpenCV cannot."""
        self.close()
        try:
            cap = self._factory(self._target(), self._api(), self._params())
        except cv2.error as exc:
            raise SourceError(f"{self.name}: OpenCV could not open it: {exc}") from exc
        if cap is None or not cap.isOpened():
            if cap is not None:
                cap.release()
            raise SourceError(f"{self.name}: cannot open{self._open_hint()}")
        self._configure(cap)
        self._cap = cap
        log.info("opened %s", self.name)

    def _grab(self) -> np.ndarray | None:
        if self._cap is None:
            raise SourceError(f"{self.name}: read before open")
        try:
            ok, image = self._cap.read()
        except cv2.error as exc:
            raise SourceError(f"{self.name}: read failed: {exc}") from exc
        if not ok or image is None or image.size == 0:
            return None
        return image

    def read(self) -> np.ndarray | None:
        """The next frame, or None if the capture delivered none this time."""
        return self._grab()

    def close(self) -> None:
        """Release the capture; safe to call twice."""
        cap, self._cap = self._cap, None
        if cap is not None:
            cap.release()


class V4L2Source(_CaptureSource):
    """A local camera through Video4Linux2, by index (0) or device path (/dev/video0, /dev/v4l/by-id/...)."""

    live = True

    def __init__(
        self,
        device: int | str,
        *,
        width: int | None = None,
        height: int | None = None,
        fps: float | None = None,
        fourcc: str | None = None,
        buffer_size: int = 1,
        capture_factory: CaptureFactory | None = None,
    ) -> None:
        super().__init__(capture_factory)
        self.device = device
        self.width, self.height, self.fps, self.fourcc = width, height, fps, fourcc
        self.buffer_size = buffer_size
        self.name = f"v4l2:{device}"

    def _target(self) -> int | str:
        return self.device

    def _api(self) -> int:
        return cv2.CAP_V4L2

    def _open_hint(self) -> str:
        return " (is the camera plugged in, is the device path right, is another process using it?)"

    def _configure(self, cap: Any) -> None:
        # FOURCC before size: some UVC cameras only offer high resolutions as MJPG.
        if self.fourcc:
            cap.set(cv2.CAP_PROP_FOURCC, cv2.VideoWriter_fourcc(*self.fourcc))
        if self.width:
            cap.set(cv2.CAP_PROP_FRAME_WIDTH, self.width)
        if self.height:
            cap.set(cv2.CAP_PROP_FRAME_HEIGHT, self.height)
        if self.fps:
            cap.set(cv2.CAP_PROP_FPS, self.fps)
        # The driver queues frames (4 by default); a short queue keeps the
        # "latest" frame close to the moment the trigger arrived.
        cap.set(cv2.CAP_PROP_BUFFERSIZE, self.buffer_size)


class StreamSource(_CaptureSource):
    """A network camera stream (RTSP or HTTP MJPEG) read through FFMPEG."""

    live = True

    def __init__(
        self,
        url: str,
        *,
        open_timeout_s: float = 10.0,
        read_timeout_s: float = 10.0,
        capture_factory: CaptureFactory | None = None,
    ) -> None:
        super().__init__(capture_factory)
        self.url = url
        self.open_timeout_s = open_timeout_s
        self.read_timeout_s = read_timeout_s
        # The URL often carries the camera password; the name is what gets logged.
        self.name = redact_url(url)

    def _target(self) -> str:
        return self.url

    def _api(self) -> int:
        return cv2.CAP_FFMPEG

    def _params(self) -> list[int]:
        # Without these FFMPEG may block for ~30 s on a dead camera, and the
        # grabber cannot stop or reconnect while a read is blocked.
        return [
            cv2.CAP_PROP_OPEN_TIMEOUT_MSEC,
            int(self.open_timeout_s * 1000),
            cv2.CAP_PROP_READ_TIMEOUT_MSEC,
            int(self.read_timeout_s * 1000),
        ]

    def _open_hint(self) -> str:
        return " (check the URL, the network and the camera's credentials)"


class VideoFileSource(_CaptureSource):
    """A recorded video file; with ``loop`` it starts again at the end, otherwise raises SourceEnded."""

    live = False

    def __init__(self, path: str | Path, *, loop: bool = False, capture_factory: CaptureFactory | None = None) -> None:
        super().__init__(capture_factory)
        self.path = Path(path)
        self.loop = loop
        self.name = f"file:{self.path}"

    def _target(self) -> str:
        return str(self.path)

    def _api(self) -> int:
        return cv2.CAP_ANY

    def _open_hint(self) -> str:
        if not self.path.exists():
            return " (file does not exist)"
        return " (not a video OpenCV can decode)"

    def read(self) -> np.ndarray | None:
        """The next frame; at the end rewind (loop) or raise SourceEnded."""
        image = self._grab()
        if image is not None:
            return image
        if not self.loop:
            raise SourceEnded(f"{self.name}: end of video")
        # Seeking is unreliable for some containers; reopening always rewinds.
        if not self._cap.set(cv2.CAP_PROP_POS_FRAMES, 0) or (image := self._grab()) is None:
            self.open()
            image = self._grab()
        if image is None:
            raise SourceError(f"{self.name}: no readable frames")
        return image


@dataclass(frozen=True)
class _Seen:
    mtime_ns: int
    size: int
    inode: int  # a file replaced by rename is new even if size and mtime match


class DirectorySource:
    """A folder watched for new image files; each file is decoded once, in name (or mtime) order.

    A file counts as new when its name, size, mtime or inode has not been read before,
    so a camera that overwrites ``latest.jpg`` is read on every overwrite. A file
    is only read once its size and mtime were the same on two consecutive scans
    (``stable_scans``), so a half-written file is not decoded. Unreadable files
    are logged, counted in ``bad_files`` and skipped. With ``loop`` the folder's
    images are replayed in order whenever nothing new has arrived (demo camera).
    ``frames_per_image`` delivers each image that many times in a row, so a demo
    folder looks like envelopes that stay under the camera for a while (a scene-
    change trigger needs a still scene to fire).

    With ``lazy`` (the default) ``read`` returns an ``EncodedImage``: the file's bytes, decoded
    only when an item needs the frame (an idle agent decodes nothing). JPEG and PNG files are
    checked for a whole file (start and end markers) when read; other formats are decoded then.
    """

    live = False

    def __init__(
        self,
        path: str | Path,
        *,
        loop: bool = False,
        order: str = "name",
        include_existing: bool = True,
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
        stable_scans: int = 1,
        max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
        frames_per_image: int = 1,
        lazy: bool = True,
    ) -> None:
        if order not in ("name", "mtime"):
            raise ValueError(f"order must be 'name' or 'mtime', not {order!r}")
        if frames_per_image < 1:
            raise ValueError(f"frames_per_image must be at least 1, not {frames_per_image}")
        self.frames_per_image = frames_per_image
        self.lazy = lazy
        self._held: np.ndarray | EncodedImage | None = None
        self._held_left = 0
        self.path = Path(path)
        self.loop = loop
        self.order = order
        self.include_existing = include_existing
        self.extensions = tuple(e.lower() for e in extensions)
        self.stable_scans = stable_scans
        self.max_file_bytes = max_file_bytes
        self.name = f"dir:{self.path}"
        self.bad_files = 0
        self._replayed: dict[str, tuple[_Seen, np.ndarray | EncodedImage]] = {}
        self.last_bad: str | None = None
        # Kept across close()/open() so a reconnect does not re-read old files.
        self._seen: dict[str, _Seen] = {}
        self._pending: dict[str, tuple[_Seen, int]] = {}  # candidate -> (stat, scans unchanged)
        self._bad: set[str] = set()
        self._replay_index = 0
        self._is_open = False
        self._first_open = True

    def open(self) -> None:
        """Check the folder is there and readable; raise SourceError if not."""
        if not self.path.is_dir():
            raise SourceError(f"{self.name}: folder does not exist or is not a directory")
        listing = self._scan()
        if self._first_open and not self.include_existing:
            self._seen.update(listing)
        # Files already there when we open count as one stable scan, so they
        # are read on the first read() instead of the second.
        for name, stat in listing.items():
            if self._seen.get(name) != stat:
                self._pending[name] = (stat, 0)
        self._first_open = False
        self._is_open = True
        log.info("watching %s (%d images present)", self.name, len(listing))

    def close(self) -> None:
        """Stop watching; remembers which files were read."""
        self._is_open = False
        self._held, self._held_left = None, 0
        self._pending.clear()

    def _scan(self) -> dict[str, _Seen]:
        try:
            entries = list(os.scandir(self.path))
        except OSError as exc:
            raise SourceError(f"{self.name}: cannot list folder: {exc.strerror or exc}") from exc
        listing: dict[str, _Seen] = {}
        for entry in entries:
            if entry.name.startswith(".") or not entry.name.lower().endswith(self.extensions):
                continue
            try:
                if not entry.is_file():
                    continue
                st = entry.stat()
            except OSError:
                continue  # removed between listing and stat
            listing[entry.name] = _Seen(st.st_mtime_ns, st.st_size, st.st_ino)
        return listing

    def _ordered(self, names: list[str], listing: dict[str, _Seen]) -> list[str]:
        if self.order == "mtime":
            return sorted(names, key=lambda n: (listing[n].mtime_ns, n))
        return sorted(names)

    def _load(self, name: str, stat: _Seen) -> np.ndarray | EncodedImage | None:
        """Read one file (decoded, or encoded when lazy); log, count and return None if it is unreadable."""
        path = self.path / name
        try:
            if stat.size > self.max_file_bytes:
                raise FrameError(f"{path}: {stat.size} bytes is over the {self.max_file_bytes}-byte limit")
            data = path.read_bytes()
            if not self.lazy:
                return decode_image(data, str(path))
            image = EncodedImage(data, str(path))
            whole = looks_whole(data)
            if whole is None:
                image.decode()  # a format without a cheap check: find out now whether it is readable
            elif not whole:
                raise FrameError(f"{path}: {'file is empty' if not data else 'not a whole JPEG or PNG (truncated?)'}")
            return image
        except FileNotFoundError:
            log.debug("%s vanished before it was read", path)
            return None
        except (FrameError, OSError) as exc:
            self.bad_files += 1
            self.last_bad = str(exc)
            self._bad.add(name)
            log.error("skipping unreadable image: %s", exc)
            return None

    def read(self) -> np.ndarray | EncodedImage | None:
        """The next new image in the folder; a replayed one if looping; else None."""
        if not self._is_open:
            raise SourceError(f"{self.name}: read before open")
        if not self.path.is_dir():
            raise SourceError(f"{self.name}: folder has disappeared")
        if self._held_left > 0:
            self._held_left -= 1
            return self._held
        image = self._next_image()
        if image is not None and self.frames_per_image > 1:
            self._held, self._held_left = image, self.frames_per_image - 1
        return image

    def _next_image(self) -> np.ndarray | EncodedImage | None:
        listing = self._scan()
        # Forget files that are gone so the bookkeeping does not grow forever.
        for book in (self._seen, self._pending):
            for gone in book.keys() - listing.keys():
                del book[gone]
        self._bad &= listing.keys()

        ready: list[str] = []
        for name, stat in listing.items():
            if self._seen.get(name) == stat:
                continue
            self._bad.discard(name)  # changed since it failed: try again
            previous = self._pending.get(name)
            unchanged = previous[1] + 1 if previous and previous[0] == stat else 0
            self._pending[name] = (stat, unchanged)
            if unchanged >= self.stable_scans:
                ready.append(name)

        for name in self._ordered(ready, listing):
            stat = listing[name]
            self._seen[name] = stat
            del self._pending[name]
            image = self._load(name, stat)
            if image is not None:
                return image

        if self.loop:
            return self._replay(listing)
        return None

    def _replay(self, listing: dict[str, _Seen]) -> np.ndarray | EncodedImage | None:
        names = self._ordered([n for n in listing if n in self._seen and n not in self._bad], listing)
        for _ in range(len(names)):
            name = names[self._replay_index % len(names)]
            self._replay_index = (self._replay_index + 1) % len(names)
            # A replayed file that has not changed decodes to the same pixels: keep them
            # (read-only, shared; or the encoded file with its decodes, once made) instead of
            # reading and decoding the same PNG thirty times a second.
            cached = self._replayed.get(name)
            if cached is not None and cached[0] == listing[name]:
                return cached[1]
            image = self._load(name, listing[name])
            if image is not None:
                if len(self._replayed) < _MAX_REPLAY_CACHE:
                    if isinstance(image, np.ndarray):
                        image.flags.writeable = False
                    self._replayed[name] = (listing[name], image)
                return image
        return None


_MAX_REPLAY_CACHE = 256  # decoded images kept for looping a folder (~1 MB each at 640x480)

_DEVICE_INDEX = re.compile(r"\d+")


def open_source(
    spec: str,
    loop: bool = False,
    *,
    width: int | None = None,
    height: int | None = None,
    fps: float | None = None,
    fourcc: str | None = None,
    open_timeout_s: float = 10.0,
    read_timeout_s: float = 10.0,
    order: str = "name",
    include_existing: bool = True,
    frames_per_image: int = 1,
    lazy: bool = True,
) -> V4L2Source | StreamSource | VideoFileSource | DirectorySource:
    """Build (not open) the source a spec names: camera index or /dev path, stream URL, video file or folder.

    ``lazy``: a folder delivers its files encoded, decoded only when an item reads them.
    """
    spec = spec.strip()
    if not spec:
        raise SourceError("empty source: give a camera index, /dev/video path, stream URL, video file or folder")
    if _DEVICE_INDEX.fullmatch(spec):
        return V4L2Source(int(spec), width=width, height=height, fps=fps, fourcc=fourcc)
    if spec.startswith("/dev/"):
        # Not checked for existence: a camera may be plugged in after start-up,
        # and the grabber keeps retrying.
        return V4L2Source(spec, width=width, height=height, fps=fps, fourcc=fourcc)
    scheme = spec.split("://", 1)[0].lower() if "://" in spec else ""
    if scheme in STREAM_SCHEMES:
        return StreamSource(spec, open_timeout_s=open_timeout_s, read_timeout_s=read_timeout_s)
    if scheme:
        raise SourceError(
            f"unsupported source scheme {scheme!r} in {redact_url(spec)}: use one of {', '.join(STREAM_SCHEMES)}"
        )
    path = Path(spec).expanduser()
    if path.is_dir():
        return DirectorySource(
            path, loop=loop, order=order, include_existing=include_existing, frames_per_image=frames_per_image,
            lazy=lazy,
        )
    if path.is_file():
        if path.suffix.lower() in IMAGE_EXTENSIONS:
            raise SourceError(
                f"{path} is a single image: put it in a folder and give the folder (with loop to repeat it)"
            )
        return VideoFileSource(path, loop=loop)
    raise SourceError(f"source {spec!r} is not a camera index, /dev path, stream URL, existing video file or folder")
