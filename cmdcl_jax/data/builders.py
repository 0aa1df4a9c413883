"""TFDS builders that write F pre-decoded frames per video into ArrayRecord shards.

All four datasets share one on-disk layout, read back by `cmdcl_jax.data.pipeline`:
`<data_dir>/<dataset>/<config>/<version>/` with features `id` (text), `frames` and one
feature per task (a class id, or a uint8 multi-hot vector). `frames` is either uint8
`[F, H, W, 3]` (encoding `raw` or `zlib`) or F JPEG byte strings (encoding `jpeg`). The
metadata (`metadata.json`) holds the class names of every task, for the text prompts.

Real datasets read a user's local copy as the manual dir; a video that is missing, does
not decode or has a malformed annotation is skipped and recorded in `builder.skipped`
(with `strict`, a malformed annotation raises instead). Decoded videos are cached one
file each (written atomically) under the download dir, so an interrupted build resumes;
TFDS writes shards into an `incomplete.*` folder that it renames only when complete.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import multiprocessing
import os
import pickle
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
import tqdm
from absl import logging

from cmdcl_jax.data import annotations as ann
from cmdcl_jax.data import causal_kitchen, video

ENCODINGS = ("jpeg", "raw", "zlib")
# Task name -> (type, number of classes), per dataset.
TASKS = {
    "breakfast": {"activity": ("single", 10), "actions": ("multi", 48)},
    "coin": {"task": ("single", ann.COIN_NUM_TASKS), "step": ("multi", ann.COIN_NUM_STEPS)},
    "charades": {"action": ("multi", ann.CHARADES_NUM_CLASSES)},
    "causal_kitchen": {"activity": ("single", None), "actions": ("multi", None)},
}


@dataclasses.dataclass(eq=True)
class VideoConfig(tfds.core.BuilderConfig):
    """How frames are stored: F frames per video, short side, encoding."""

    num_frames: int = 64
    short_side: int = 256
    encoding: str = "jpeg"


def video_config(num_frames: int = 64, short_side: int = 256, encoding: str = "jpeg"):
    """A `VideoConfig` named after its fields, e.g. `f64_s256_jpeg`."""
    if encoding not in ENCODINGS:
        raise ValueError(f"encoding {encoding!r} not in {ENCODINGS}")
    return VideoConfig(
        name=f"f{num_frames}_s{short_side}_{encoding}",
        num_frames=num_frames,
        short_side=short_side,
        encoding=encoding,
    )


def frames_feature(num_frames: int, encoding: str) -> tfds.features.FeatureConnector:
    """The `frames` feature for an encoding."""
    if encoding == "jpeg":
        return tfds.features.Sequence(tfds.features.Tensor(shape=(), dtype=np.object_))
    return tfds.features.Tensor(
        shape=(num_frames, None, None, 3),
        dtype=np.uint8,
        encoding=tfds.features.Encoding.ZLIB
        if encoding == "zlib"
        else tfds.features.Encoding.BYTES,
    )


def encode_frames(frames: np.ndarray, encoding: str) -> np.ndarray | list[bytes]:
    """uint8 [F, H, W, 3] -> the value stored for `encoding`."""
    if encoding == "jpeg":
        return [video.encode_jpeg(f) for f in frames]
    return frames


def _task_features(dataset: str, sizes: dict[str, int] | None = None) -> dict:
    features = {}
    for task, (kind, num_classes) in TASKS[dataset].items():
        num_classes = num_classes or sizes[task]
        if kind == "single":
            features[task] = tfds.features.Scalar(dtype=np.int32)
        else:
            features[task] = tfds.features.Tensor(shape=(num_classes,), dtype=np.uint8)
    return features


def _multi_hot(positives: list[int], num_classes: int) -> np.ndarray:
    target = np.zeros(num_classes, np.uint8)
    target[positives] = 1
    return target


def _decode_one(job: tuple) -> tuple[object | None, str | None]:
    """Decodes one video into its stored value, through the per-video cache.

    Args:
        job: (path, span, span_unit, num_frames, short_side, encoding, cache file or None).

    Returns:
        (value, None), or (None, error message) when the video does not decode.
    """
    path, span, unit, num_frames, short_side, encoding, cache = job
    if cache is not None and os.path.exists(cache):
        with open(cache, "rb") as f:
            return pickle.load(f), None
    bounds = (
        {"start_frame": span[0], "end_frame": span[1]}
        if unit == "frames"
        else {"start_s": span[0], "end_s": span[1]}
    )
    try:
        frames = video.read_frames(path, num_frames, short_side=short_side, **bounds)
    except video.VideoDecodeError as e:
        return None, str(e)
    value = encode_frames(frames, encoding)
    if cache is not None:
        partial = f"{cache}.{os.getpid()}.part"
        with open(partial, "wb") as f:
            pickle.dump(value, f)
        os.replace(partial, cache)
    return value, None


class _Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """What every builder here shares: version 1.0.0, and TFDS's console output (its
    "Downloading and preparing" / "downloaded and prepared" lines and progress bars) only
    at absl INFO verbosity (`--verbosity=0`): a first run shows its own progress."""

    # The builders download nothing, so they need no checksums file beside their code (TFDS
    # would look for it through `importlib_resources`, which is not a dependency).
    code_path = None
    VERSION = tfds.core.Version("1.0.0")

    def download_and_prepare(self, **kwargs) -> None:
        tfds.display_progress_bar(logging.level_info())
        super().download_and_prepare(**kwargs)

    def _log_download_bytes(self) -> None:
        logging.info("preparing %s in %s", self.name, self.data_dir)

    def _log_download_done(self) -> None:
        logging.info("%s prepared in %s", self.name, self.data_dir)


class _RealVideoBuilder(_Builder, skip_registration=True):
    """Shared decoding and skipping logic of the Breakfast, COIN and Charades builders."""

    BUILDER_CONFIGS = [video_config()]
    DATASET = ""
    MIN_PATH_PARTS = 1

    def __init__(
        self, *, num_workers: int = 0, resume: bool = True, strict: bool = False, **kwargs
    ):
        """Args: num_workers: decoding processes (0 decodes in this process);
        resume: keep each decoded video in a cache file so that a re-run reuses it;
        strict: raise the first malformed annotation instead of skipping its video."""
        super().__init__(**kwargs)
        self.num_workers = num_workers
        self.resume = resume
        self.strict = strict
        self.skipped: list[dict[str, str]] = []
        self.cache_dir: Path | None = None

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {
                    "id": tfds.features.Text(),
                    "frames": frames_feature(
                        self.builder_config.num_frames, self.builder_config.encoding
                    ),
                    **_task_features(self.DATASET),
                }
            ),
            metadata=tfds.core.MetadataDict(),
        )

    def _read_annotations(
        self, manual_dir: Path
    ) -> tuple[list[ann.VideoItem], list[ann.BadVideo], dict]:
        """(items, videos with a malformed annotation, task -> class names)."""
        raise NotImplementedError

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        manual_dir = Path(dl_manager.manual_dir)
        items, bad, names = self._read_annotations(manual_dir)
        if bad and self.strict:
            raise bad[0].error
        self.info.metadata["tasks"] = {
            task: {"type": TASKS[self.DATASET][task][0], "names": list(names[task])}
            for task in TASKS[self.DATASET]
        }
        index = ann.index_videos(manual_dir)
        used = set()  # videos accounted for, so not reported as unlabelled
        for entry in bad:
            self._skip(entry.split, entry.key, entry.video, f"bad annotation: {entry.error}")
            used.add(ann.find_video(index, entry.video, self.MIN_PATH_PARTS))
        by_split: dict[str, list[tuple[ann.VideoItem, Path]]] = {}
        for item in items:
            path = ann.find_video(index, item.video, self.MIN_PATH_PARTS)
            if path is None:
                self._skip(item.split, item.key, item.video, "missing video")
            else:
                by_split.setdefault(item.split, []).append((item, path))
        used |= {path for pairs in by_split.values() for _, path in pairs}
        for path in sorted({p for p in index.values() if p is not None} - used):
            if not self._ignored(path):
                rel = path.relative_to(manual_dir).as_posix()
                self._skip("-", path.stem, rel, "no label")
        if self.resume:
            # Decoded videos wait here until the build completes.
            name = f"{self.name}_{self.builder_config.name}"
            self.cache_dir = Path(dl_manager.download_dir) / name
            self.cache_dir.mkdir(parents=True, exist_ok=True)
        return {split: self._generate_examples(pairs) for split, pairs in sorted(by_split.items())}

    def _ignored(self, path: Path) -> bool:
        """Whether an unlabelled video file is expected (and so not reported)."""
        del path
        return False

    def _skip(self, split: str, key: str, video_path: str, reason: str) -> None:
        logging.warning("skipping %s (%s): %s", key, video_path, reason)
        self.skipped.append({"split": split, "id": key, "video": video_path, "reason": reason})

    def _generate_examples(self, pairs: list[tuple[ann.VideoItem, Path]]) -> Iterator:
        cfg = self.builder_config
        jobs = [
            (str(path), item.span, item.span_unit, cfg.num_frames, cfg.short_side, cfg.encoding,
             str(self.cache_dir / f"{item.key}.pkl") if self.resume else None)
            for item, path in pairs
        ]  # fmt: skip
        with _executor(self.num_workers) as pool:
            results = pool.map(_decode_one, jobs) if pool else map(_decode_one, jobs)
            desc = f"decoding {self.name} {pairs[0][0].split if pairs else ''}"
            for (item, _), (value, error) in tqdm.tqdm(
                zip(pairs, results, strict=True), total=len(jobs), desc=desc
            ):
                if error is not None:
                    self._skip(item.split, item.key, item.video, f"decode failed: {error}")
                    continue
                example = {"id": item.key, "frames": value}
                for task, (kind, num_classes) in TASKS[self.DATASET].items():
                    label = item.labels[task]
                    example[task] = label if kind == "single" else _multi_hot(label, num_classes)
                yield item.key, example


class _NoPool:
    """Stands in for a process pool when decoding runs in this process."""

    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _executor(num_workers: int):
    if num_workers <= 0:
        return _NoPool()
    return concurrent.futures.ProcessPoolExecutor(
        num_workers, mp_context=multiprocessing.get_context("spawn")
    )


class Breakfast(_RealVideoBuilder):
    """Breakfast: 10 activities, 48 unit actions; P03-P46 train, P47-P54 test."""

    DATASET = "breakfast"
    MIN_PATH_PARTS = 2
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Manual dir: the participant folders (P03/cam01/P03_cereals.avi, ...) and "
        "segmentation_coarse/<activity>/*.txt, anywhere below it."
    )

    def _ignored(self, path: Path) -> bool:
        return path.stem.endswith("_ch1")  # The second stereo channel; only ch0 counts.

    def _read_annotations(self, manual_dir):
        items, bad = ann.breakfast_items(manual_dir, test_participants=range(47, 55))
        names = {
            "activity": ann.BREAKFAST_ACTIVITY_PROMPTS,
            "actions": [ann.breakfast_action_prompt(a) for a in ann.BREAKFAST_ACTIONS],
        }
        return items, bad, names


class Coin(_RealVideoBuilder):
    """COIN: 180 tasks, 778 steps; the `subset` field gives the split."""

    DATASET = "coin"
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Manual dir: COIN.json and videos/<recipe_type>/<id>.mp4."

    def _read_annotations(self, manual_dir):
        items, bad, tasks, steps = ann.coin_items(manual_dir / "COIN.json")
        return items, bad, {"task": tasks, "step": steps}


class Charades(_RealVideoBuilder):
    """Charades: 157 actions, multi-label; the official train / test CSVs."""

    DATASET = "charades"
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Manual dir: Charades_v1_{train,test}.csv, Charades_v1_classes.txt and <id>.mp4 videos."
    )

    def _read_annotations(self, manual_dir):
        classes = ann.charades_classes(manual_dir / "Charades_v1_classes.txt")
        items, bad = [], []
        for split in ("train", "test"):
            split_items, split_bad = ann.charades_items(
                manual_dir / f"Charades_v1_{split}.csv", split
            )
            items += split_items
            bad += split_bad
        return items, bad, {"action": classes}


@dataclasses.dataclass(eq=True)
class KitchenConfig(tfds.core.BuilderConfig):
    """A CausalKitchen build: its `KitchenSpec`."""

    spec: causal_kitchen.KitchenSpec = dataclasses.field(default_factory=causal_kitchen.KitchenSpec)


def kitchen_config(spec: causal_kitchen.KitchenSpec) -> KitchenConfig:
    """A `KitchenConfig` named after every field of `spec`."""
    s = spec

    def num(x: float) -> str:
        return f"{x:g}".replace(".", "p")

    name = (
        f"seed{s.seed}_c{s.num_activities}_n{s.num_train}-{s.num_val}-{s.num_test}"
        f"_f{s.num_frames}_s{s.frame_size}_bg{num(s.background_bias)}"
        f"_salt{num(s.salt_bias)}_a{s.bias_activity}"
    )
    return KitchenConfig(name=name, spec=spec)


class CausalKitchen(_Builder, skip_registration=True):
    """CausalKitchen (see `causal_kitchen`): splits train, test_iid, test_shifted, val_shifted."""

    BUILDER_CONFIGS = [kitchen_config(causal_kitchen.KitchenSpec())]

    def _info(self) -> tfds.core.DatasetInfo:
        spec = self.builder_config.spec
        sizes = {
            "activity": spec.num_activities,
            "actions": len(causal_kitchen.action_names(spec)),
        }
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {
                    "id": tfds.features.Text(),
                    "frames": frames_feature(spec.num_frames, "zlib"),
                    "background": tfds.features.Scalar(dtype=np.int32),
                    **_task_features("causal_kitchen", sizes),
                }
            ),
            metadata=tfds.core.MetadataDict(
                tasks={
                    "activity": {
                        "type": "single",
                        "names": causal_kitchen.activity_names(spec),
                    },
                    "actions": {"type": "multi", "names": causal_kitchen.action_names(spec)},
                },
                spec=dataclasses.asdict(spec),
            ),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {split: self._generate_examples(split) for split in causal_kitchen.SPLITS}

    def _generate_examples(self, split: str):
        spec = self.builder_config.spec
        num_actions = len(causal_kitchen.action_names(spec))
        for key, example in causal_kitchen.generate(spec, split):
            example["actions"] = _multi_hot(example["actions"], num_actions)
            yield key, {"id": key, **example}


BUILDERS = {"breakfast": Breakfast, "coin": Coin, "charades": Charades}


def build_causal_kitchen(data_dir: str, **spec_kwargs) -> str:
    """Builds CausalKitchen under `data_dir` unless already there (a few seconds).

    Args:
        data_dir: TFDS data dir.
        **spec_kwargs: fields of `causal_kitchen.KitchenSpec`.

    Returns:
        The config name to pass to the loaders.
    """
    config = kitchen_config(causal_kitchen.KitchenSpec(**spec_kwargs))
    make_builder(CausalKitchen, config, data_dir).download_and_prepare()
    return config.name


def make_builder(cls: type, config: tfds.core.BuilderConfig, data_dir: str, **kwargs):
    """`cls(config=...)` writing ArrayRecord; a config equal to a preset goes by name."""
    if config.name in cls.builder_configs:
        if cls.builder_configs[config.name] != config:
            raise ValueError(f"config {config.name!r} differs from the preset of that name")
        config = config.name
    return cls(config=config, data_dir=data_dir, file_format="array_record", **kwargs)
