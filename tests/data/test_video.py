"""Frame resizing and JPEG coding: this thread's swscale context, on this thread alone,
gives the pixels of PyAV's defaults (a fresh context with a thread per core)."""

import os
import subprocess
import sys
import threading

import av
import numpy as np

from cmdcl_jax.data import video


def _fresh_context(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """The reference: ``VideoFrame.reformat``, a new scaling context for every frame, with
    swscale's threads."""
    out = []
    for frame in frames:
        image = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
        resized = image.reformat(width=width, height=height, interpolation="BILINEAR")
        out.append(resized.to_ndarray(format="rgb24"))
    return np.stack(out)


def _clips(seed: int):
    """Random clips of changing frame and output sizes, as random crops give them."""
    rng = np.random.default_rng(seed)
    for _ in range(6):
        h, w = rng.integers(20, 70, size=2)
        size = int(rng.integers(8, 40))
        yield rng.integers(0, 256, (3, h, w, 3), dtype=np.uint8), size, int(size * 1.25)


def test_resize_matches_a_fresh_context_across_sizes():
    for frames, height, width in _clips(0):
        expected = _fresh_context(frames, height, width)
        np.testing.assert_array_equal(video.resize(frames, height, width), expected)


def test_resize_from_two_threads_at_once_matches_a_fresh_context():
    failures = []

    def work(seed):
        for _ in range(5):
            for frames, height, width in _clips(seed):
                if not np.array_equal(
                    video.resize(frames, height, width), _fresh_context(frames, height, width)
                ):
                    failures.append((seed, frames.shape, height, width))

    threads = [threading.Thread(target=work, args=(seed,)) for seed in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures


def test_jpeg_coding_matches_pyav_defaults():
    rng = np.random.default_rng(3)
    frame = rng.integers(0, 256, (38, 50, 3), dtype=np.uint8)
    image = av.VideoFrame.from_ndarray(frame, format="rgb24")
    ours = video._reformat(image, format="yuvj420p").to_ndarray()  # [H * 3 / 2, W] planes
    np.testing.assert_array_equal(ours, image.reformat(format="yuvj420p").to_ndarray())
    data = video.encode_jpeg(frame)
    decoded = av.CodecContext.create("mjpeg", "r").decode(av.Packet(data))[0]
    np.testing.assert_array_equal(video.decode_jpeg(data), decoded.to_ndarray(format="rgb24"))


def test_resize_starts_no_threads():
    """swscale's threads (by default one per core, kept with the context) cost ~25 us a
    call; the loaders already keep the cores busy with a clip per thread or process."""
    if not os.path.isdir("/proc/self/task"):
        return  # threads are counted from Linux's /proc
    code = (
        "import os, numpy as np\n"
        "from cmdcl_jax.data import video\n"
        "threads = lambda: len(os.listdir('/proc/self/task'))\n"
        "before = threads()\n"
        "video.resize(np.zeros((2, 58, 61, 3), np.uint8), 32, 32)\n"
        "print(before, threads())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    before, after = map(int, out.stdout.split())
    assert after == before, f"{after - before} threads started"
