"""Frame I/O with PyAV: decode a span of a video into F frames, JPEG coding, resizing.

PyAV is the only image library the data code needs: it decodes the containers, its
swscale does the resizing and its MJPEG codec writes and reads per-frame JPEG.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

import av
import numpy as np
from av.video.reformatter import VideoReformatter

# FFmpeg's AV_CODEC_FLAG_QSCALE: encode at the fixed quantiser given by global_quality.
_FLAG_QSCALE = 2
_FF_QP2LAMBDA = 118


_local = threading.local()


def _reformatter() -> VideoReformatter:
    """This thread's swscale reformatter. ``VideoFrame.reformat`` makes a new one, with a
    new scaling context, for every frame: 240 us of a 60 -> 32 px frame's 290 us
    (measured); one kept per thread reuses its context while the sizes stay the same and
    gives the same pixels. Per thread because a context is not safe to share."""
    if not hasattr(_local, "reformatter"):
        _local.reformatter = VideoReformatter()
    return _local.reformatter


def _reformat(frame: av.VideoFrame, **size_or_format) -> av.VideoFrame:
    """``frame`` scaled (bilinear) or converted by this thread's context, on this thread.

    swscale's own threads (``threads=0``, one per core) cost ~25 us a call: a 58 -> 32 px
    frame took 35 us with them and 12 us without, the same pixels. The loaders already
    work on one clip per thread or process, so the cores are busy without them: at 224 px,
    two loader threads resized as many clips a second either way (measured, 2 cores).
    """
    return _reformatter().reformat(frame, interpolation="BILINEAR", threads=1, **size_or_format)


class VideoDecodeError(RuntimeError):
    """A container that cannot be opened or yields no frame."""


def span_times(num_frames: int, start_s: float, end_s: float) -> np.ndarray:
    """Centres of `num_frames` equal segments of [start_s, end_s].

    Returns:
        float64 [F] timestamps in seconds.
    """
    edges = np.linspace(start_s, end_s, num_frames + 1)
    return (edges[:-1] + edges[1:]) / 2


def resize_short_side(height: int, width: int, short_side: int) -> tuple[int, int]:
    """Output (height, width) with the short side at `short_side` and the aspect kept."""
    scale = short_side / min(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def resize(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of uint8 RGB frames [T, h, w, 3] -> [T, height, width, 3]."""
    if frames.shape[1:3] == (height, width):
        return frames
    out = np.empty((frames.shape[0], height, width, 3), np.uint8)
    for t, frame in enumerate(frames):
        image = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
        out[t] = _reformat(image, width=width, height=height).to_ndarray()
    return out


def read_frames(
    path: str,
    num_frames: int,
    *,
    short_side: int | None,
    start_s: float = 0.0,
    end_s: float | None = None,
    start_frame: int | None = None,
    end_frame: int | None = None,
) -> np.ndarray:
    """Decodes `num_frames` frames spread over a span of a video.

    The span is given in seconds (`start_s`, `end_s`; `end_s=None` is the end of the
    video) or in 0-indexed frames (`start_frame` inclusive, `end_frame` exclusive),
    converted with the stream's average frame rate. Each output frame is the first
    decoded frame at or after the centre of its segment; targets past the last frame
    repeat it.

    Args:
        path: video file.
        num_frames: F, frames to return.
        short_side: resize so that the short side has this size; None keeps the size.
        start_s: span start, seconds.
        end_s: span end, seconds.
        start_frame: span start, frames (overrides `start_s`).
        end_frame: span end, frames (overrides `end_s`).

    Returns:
        uint8 [F, H, W, 3].

    Raises:
        VideoDecodeError: the file cannot be decoded or holds no video frame.
    """
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise VideoDecodeError(f"{path}: no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            fps = float(stream.average_rate or 25)
            if start_frame is not None:
                start_s = start_frame / fps
            if end_frame is not None:
                end_s = end_frame / fps
            if end_s is None:
                end_s = _duration_s(container, stream)
            end_s = max(end_s, start_s + 1.0 / fps)
            # Half a frame of slack so that a target on a frame's timestamp takes that frame.
            targets = span_times(num_frames, start_s, end_s) - 0.5 / fps
            picked: list[np.ndarray] = []
            last = None
            for frame in container.decode(stream):
                time = frame.time if frame.time is not None else 0.0
                last = frame
                while len(picked) < num_frames and time >= targets[len(picked)]:
                    picked.append(_to_rgb(frame, short_side))
                if len(picked) == num_frames:
                    break
    except av.FFmpegError as e:
        raise VideoDecodeError(f"{path}: {e}") from e
    if last is None:
        raise VideoDecodeError(f"{path}: no decodable frame")
    if len(picked) < num_frames:
        tail = _to_rgb(last, short_side)
        picked.extend([tail] * (num_frames - len(picked)))
    return np.stack(picked)  # [F, H, W, 3]


def _duration_s(container: av.container.InputContainer, stream: av.VideoStream) -> float:
    """Length of a video stream in seconds, from the stream or else the container."""
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / av.time_base
    raise VideoDecodeError(f"{container.name}: unknown duration")


def _to_rgb(frame: av.VideoFrame, short_side: int | None) -> np.ndarray:
    """One decoded frame as uint8 [H, W, 3], short side resized."""
    if short_side is None:
        return _reformat(frame, format="rgb24").to_ndarray()
    height, width = resize_short_side(frame.height, frame.width, short_side)
    return _reformat(frame, width=width, height=height, format="rgb24").to_ndarray()


def encode_jpeg(frame: np.ndarray, quality: int = 2) -> bytes:
    """Encodes a uint8 [H, W, 3] frame as JPEG; `quality` is the MJPEG qscale (1 best, 31)."""
    codec = av.CodecContext.create("mjpeg", "w")
    codec.height, codec.width = frame.shape[:2]
    codec.pix_fmt = "yuvj420p"
    codec.options = {"qmin": str(quality), "qmax": str(quality)}
    codec.flags |= _FLAG_QSCALE
    codec.global_quality = quality * _FF_QP2LAMBDA
    image = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
    packets = codec.encode(_reformat(image, format="yuvj420p")) + codec.encode(None)
    return b"".join(bytes(p) for p in packets)


def decode_jpeg(data: bytes) -> np.ndarray:
    """Decodes one JPEG into uint8 [H, W, 3]."""
    frames = av.CodecContext.create("mjpeg", "r").decode(av.Packet(data))
    return _reformat(frames[0], format="rgb24").to_ndarray()


def write_video(
    path: str, frames: Iterable[np.ndarray], fps: int = 15, codec: str = "mpeg4"
) -> None:
    """Encodes frames, each [H, W, 3] with even H and W, into a video file."""
    with av.open(path, "w") as container:
        stream = None
        for frame in frames:
            if stream is None:
                stream = container.add_stream(codec, rate=fps)
                stream.height, stream.width = frame.shape[:2]
                stream.pix_fmt = "yuv420p"
            image = av.VideoFrame.from_ndarray(np.asarray(frame, np.uint8), format="rgb24")
            container.mux(stream.encode(image))
        container.mux(stream.encode(None))
