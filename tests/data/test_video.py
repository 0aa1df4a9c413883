"""Frame resizing: a reused swscale context gives the pixels of a fresh one."""

import threading

import av
import numpy as np

from cmdcl_jax.data import video


def _fresh_context(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """The reference: ``VideoFrame.reformat``, a new scaling context for every frame."""
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
