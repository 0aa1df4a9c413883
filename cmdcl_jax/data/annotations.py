"""Parsers for the official annotation files of Breakfast, COIN and Charades (docs/data.md).

A malformed annotation of one video does not stop the others: the `*_items` readers return
it as a `BadVideo` whose `AnnotationError` names the file and the line (or COIN.json key),
beside the videos that parsed. A fault no video can be separated from (a missing folder,
a CSV without its header, a broken class list) raises `AnnotationError` at once.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import re
from collections.abc import Iterable
from pathlib import Path

VIDEO_SUFFIXES = (".mp4", ".avi", ".webm", ".mkv", ".mov")


class AnnotationError(ValueError):
    """A malformed annotation file; the message names the file and line or key."""


@dataclasses.dataclass(frozen=True)
class BadVideo:
    """A video whose annotation is malformed, so it cannot be labelled.

    Attributes:
        key: the example id it would have had ("" when even that is unknown).
        split: "train", "test", or "-" when unknown.
        video: its expected path relative to the manual dir ("" when unknown).
        error: what is wrong, naming the file and line or key.
    """

    key: str
    split: str
    video: str
    error: AnnotationError


@dataclasses.dataclass(frozen=True)
class VideoItem:
    """One video to decode, with its labels.

    Attributes:
        key: unique example id within the dataset.
        split: "train" or "test".
        video: path of the video relative to the manual dir (not checked to exist).
        span: (start, end) of the annotated span; `span_unit` says in what.
        span_unit: "frames" (0-indexed, end exclusive) or "seconds"; end None is the end.
        labels: feature name -> int class id or list of positive class ids.
    """

    key: str
    split: str
    video: str
    span: tuple[float, float | None]
    span_unit: str
    labels: dict[str, int | list[int]]


# ----------------------------------------------------------------------------- Breakfast

BREAKFAST_ACTIVITIES = (
    "cereals", "coffee", "friedegg", "juice", "milk",
    "pancake", "salat", "sandwich", "scrambledegg", "tea",
)  # fmt: skip
BREAKFAST_ACTIVITY_PROMPTS = (
    "cereal", "coffee", "fried egg", "juice", "milk",
    "pancake", "salad", "sandwich", "scrambled egg", "tea",
)  # fmt: skip
BREAKFAST_ACTIONS = (
    "SIL", "add_saltnpepper", "add_teabag", "butter_pan", "crack_egg", "cut_bun",
    "cut_fruit", "cut_orange", "fry_egg", "fry_pancake", "peel_fruit", "pour_cereals",
    "pour_coffee", "pour_dough2pan", "pour_egg2pan", "pour_flour", "pour_juice", "pour_milk",
    "pour_oil", "pour_sugar", "pour_water", "put_bunTogether", "put_egg2plate",
    "put_fruit2bowl", "put_pancake2plate", "put_toppingOnTop", "smear_butter", "spoon_flour",
    "spoon_powder", "spoon_sugar", "squeeze_orange", "stir_cereals", "stir_coffee",
    "stir_dough", "stir_egg", "stir_fruit", "stir_milk", "stir_tea", "stirfry_egg",
    "take_bowl", "take_butter", "take_cup", "take_eggs", "take_glass", "take_knife",
    "take_plate", "take_squeezer", "take_topping",
)  # fmt: skip
_BREAKFAST_LINE = re.compile(r"^\s*(\d+)\s*-\s*(\d+)\s+(\S+)\s*$")
_BREAKFAST_FILE = re.compile(r"^(P\d\d)_([A-Za-z]+\d*)_(P\d\d_[A-Za-z]+)\.txt$")


def breakfast_action_prompt(name: str) -> str:
    """Readable prompt text of a unit action: "pour_egg2pan" -> "pour egg to pan"."""
    if name == "SIL":
        return "background"
    text = re.sub(r"2", " to ", name).replace("_", " ")
    text = re.sub(r"([a-z])([A-Z])", r"\1 \2", text).lower()
    return text.replace("saltnpepper", "salt and pepper").replace("  ", " ").strip()


def parse_breakfast_segments(path: Path) -> list[tuple[int, int, str]]:
    """Reads a coarse segmentation file: `start-end label` lines, 1-indexed inclusive.

    Zero-length segments, written `start-(start-1)` (`477-476 SIL`, `1-0 SIL` in the real
    files), hold no frame and are left out.

    Returns:
        (start, end, label) per segment.

    Raises:
        AnnotationError: naming the file and line of a malformed segment.
    """
    try:
        lines = path.read_text().splitlines()
    except UnicodeDecodeError as e:
        raise AnnotationError(f"{path}: not a text file: {e}") from e
    segments = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        match = _BREAKFAST_LINE.match(line)
        if not match:
            raise AnnotationError(f"{path}:{lineno}: expected 'start-end label', got {line!r}")
        start, end, label = int(match[1]), int(match[2]), match[3]
        if end < start - 1 or start < 1:
            raise AnnotationError(f"{path}:{lineno}: bad frame range {start}-{end}")
        if label not in BREAKFAST_ACTIONS:
            raise AnnotationError(f"{path}:{lineno}: unknown unit action {label!r}")
        if end >= start:
            segments.append((start, end, label))
    if not segments:
        raise AnnotationError(f"{path}: no segment")
    return segments


def breakfast_video_path(label_file: Path) -> tuple[str, str]:
    """Maps `P03_cam01_P03_cereals.txt` to ("P03", "P03/cam01/P03_cereals.avi").

    Stereo label files (`P16_stereo01_P16_cereals.txt`) map to the ch0 video
    `P16/stereo/P16_cereals_ch0.avi`.
    """
    match = _BREAKFAST_FILE.match(label_file.name)
    if not match:
        raise AnnotationError(f"{label_file}: file name is not P??_<camera>_P??_<activity>.txt")
    participant, camera, stem = match[1], match[2], match[3]
    if camera.startswith("stereo"):
        return participant, f"{participant}/stereo/{stem}_ch0.avi"
    return participant, f"{participant}/{camera}/{stem}.avi"


def breakfast_items(
    manual_dir: Path, test_participants: Iterable[int]
) -> tuple[list[VideoItem], list[BadVideo]]:
    """All Breakfast videos of `segmentation_coarse/<activity>/*.txt`, one per label file.

    Args:
        manual_dir: holds `segmentation_coarse/` and the participant folders.
        test_participants: participant numbers of the test split (47..54 in the paper).

    Returns:
        (labelled videos, videos whose label file is malformed).
    """
    root = manual_dir / "segmentation_coarse"
    if not root.is_dir():
        raise AnnotationError(f"{root}: missing (the coarse segmentation folder)")
    test = set(test_participants)
    items, bad = [], []
    for label_file in sorted(root.glob("*/*.txt")):
        try:
            participant, video = breakfast_video_path(label_file)
        except AnnotationError as e:
            bad.append(BadVideo(key=label_file.stem, split="-", video="", error=e))
            continue
        key = Path(video).with_suffix("").as_posix().replace("/", "_")
        split = "test" if int(participant[1:]) in test else "train"
        try:
            labels = _breakfast_labels(label_file)
        except AnnotationError as e:
            bad.append(BadVideo(key=key, split=split, video=video, error=e))
            continue
        items.append(VideoItem(key, split, video, **labels))
    return items, bad


def _breakfast_labels(label_file: Path) -> dict:
    """The span and labels of one label file, as `VideoItem` fields."""
    activity = label_file.parent.name
    if activity not in BREAKFAST_ACTIVITIES:
        raise AnnotationError(f"{label_file}: unknown activity folder {activity!r}")
    if not label_file.stem.endswith(activity):
        raise AnnotationError(f"{label_file}: file name disagrees with folder {activity!r}")
    segments = parse_breakfast_segments(label_file)
    actions = sorted({BREAKFAST_ACTIONS.index(s[2]) for s in segments} | {0})
    return {
        "span": (segments[0][0] - 1, segments[-1][1]),
        "span_unit": "frames",
        "labels": {"activity": BREAKFAST_ACTIVITIES.index(activity), "actions": actions},
    }


# ----------------------------------------------------------------------------- COIN

COIN_NUM_TASKS = 180
COIN_NUM_STEPS = 778
_COIN_SUBSETS = {"training": "train", "testing": "test", "validation": "test"}


def _camel_to_words(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", " ", name).lower()


def coin_items(
    annotation_file: Path,
) -> tuple[list[VideoItem], list[BadVideo], list[str], list[str]]:
    """Reads COIN.json.

    Task names come from the `class` field (CamelCase split into words), step names from
    the annotation labels keyed by step id; ids never seen get "task N" / "step N".

    Returns:
        (labelled videos, videos whose entry is malformed, task names [180],
        step names [778]).
    """
    try:
        database = json.loads(annotation_file.read_text())["database"]
        entries = database.items()
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise AnnotationError(f"{annotation_file}: not a COIN.json with 'database': {e}") from e
    tasks = [f"task {i}" for i in range(COIN_NUM_TASKS)]
    steps = [f"step {i + 1}" for i in range(COIN_NUM_STEPS)]
    items, bad = [], []
    for video_id, entry in entries:
        where = f"{annotation_file}: database[{video_id!r}]"
        try:
            item, task_name, step_names = _coin_item(video_id, entry, where)
        except AnnotationError as e:
            subset = entry.get("subset") if isinstance(entry, dict) else None
            split = _COIN_SUBSETS.get(subset, "-") if isinstance(subset, str) else "-"
            bad.append(BadVideo(key=video_id, split=split, video=f"{video_id}.mp4", error=e))
            continue
        items.append(item)
        tasks[item.labels["task"]] = task_name
        for step, name in step_names.items():
            steps[step] = name
    return items, bad, tasks, steps


def _coin_item(video_id: str, entry: dict, where: str) -> tuple[VideoItem, str, dict[int, str]]:
    """One COIN.json entry: (item, task name, step id - 1 -> step name)."""
    try:
        task = int(entry["recipe_type"])
        subset = _COIN_SUBSETS[entry["subset"]]
        task_name = _camel_to_words(entry["class"])
        step_names = {}
        for segment in entry["annotation"]:
            step = int(segment["id"])
            if not 1 <= step <= COIN_NUM_STEPS:
                raise AnnotationError(f"{where}: step id {step} outside 1..{COIN_NUM_STEPS}")
            step_names[step - 1] = str(segment["label"])
        start, end = float(entry.get("start", 0.0)), entry.get("end")
        end = None if end is None else float(end)
    except (KeyError, ValueError, TypeError, AttributeError) as e:
        raise AnnotationError(f"{where}: bad or missing field: {e!r}") from e
    if not 0 <= task < COIN_NUM_TASKS:
        raise AnnotationError(f"{where}: recipe_type {task} outside 0..{COIN_NUM_TASKS - 1}")
    item = VideoItem(
        key=video_id,
        split=subset,
        video=f"videos/{task}/{video_id}.mp4",
        span=(start, end),
        span_unit="seconds",
        labels={"task": task, "step": sorted(step_names)},
    )
    return item, task_name, step_names


# ----------------------------------------------------------------------------- Charades

CHARADES_NUM_CLASSES = 157
_CHARADES_CLASS = re.compile(r"^c(\d{3})\s+(.+?)\s*$")
_CHARADES_ACTION = re.compile(r"^c(\d{3})\s+(-?[\d.]+)\s+(-?[\d.]+)$")


def charades_classes(path: Path) -> list[str]:
    """Reads `Charades_v1_classes.txt` (`c000 Holding some clothes`; CRLF allowed)."""
    names: dict[int, str] = {}
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        match = _CHARADES_CLASS.match(line.strip())
        if not match:
            raise AnnotationError(f"{path}:{lineno}: expected 'cNNN name', got {line!r}")
        names[int(match[1])] = match[2]
    missing = sorted(set(range(CHARADES_NUM_CLASSES)) - set(names))
    if missing or len(names) != CHARADES_NUM_CLASSES:
        raise AnnotationError(f"{path}: expected classes c000..c156, missing {missing[:5]}")
    return [names[i] for i in range(CHARADES_NUM_CLASSES)]


def charades_items(csv_file: Path, split: str) -> tuple[list[VideoItem], list[BadVideo]]:
    """Reads `Charades_v1_{train,test}.csv`; an empty `actions` field is an all-negative label.

    Segments with end <= start or past `length` still mark their class present.

    Returns:
        (labelled videos, videos whose row is malformed).
    """
    items, bad = [], []
    with csv_file.open(newline="") as f:
        reader = csv.DictReader(f)
        for field in ("id", "actions"):
            if field not in (reader.fieldnames or []):
                raise AnnotationError(f"{csv_file}:1: header lacks the {field!r} column")
        for row in reader:
            where = f"{csv_file}:{reader.line_num}"
            key = row["id"] or ""
            try:
                classes = _charades_classes_of(row, where)
            except AnnotationError as e:
                bad.append(BadVideo(key=key, split=split, video=f"{key}.mp4", error=e))
                continue
            items.append(
                VideoItem(
                    key=key,
                    split=split,
                    video=f"{key}.mp4",
                    span=(0.0, None),
                    span_unit="seconds",
                    labels={"action": classes},
                )
            )
    return items, bad


def _charades_classes_of(row: dict, where: str) -> list[int]:
    """The sorted class ids of one CSV row's `actions` field."""
    if None in row or None in row.values():
        raise AnnotationError(f"{where}: not as many fields as the header")
    if not row["id"]:
        raise AnnotationError(f"{where}: empty id")
    classes = set()
    for entry in row["actions"].split(";"):
        if not entry.strip():
            continue
        match = _CHARADES_ACTION.match(entry.strip())
        if not match or int(match[1]) >= CHARADES_NUM_CLASSES:
            raise AnnotationError(f"{where}: bad action entry {entry!r} in {row['id']}")
        classes.add(int(match[1]))
    return sorted(classes)


def index_videos(manual_dir: Path) -> dict[str, Path | None]:
    """Maps every tail of every video path under `manual_dir`, without suffix, to the file.

    `a/videos/3/abc.mp4` is indexed as `a/videos/3/abc`, `videos/3/abc`, `3/abc` and `abc`,
    so a user may keep the videos under any prefix and with any container suffix. A tail
    shared by two files maps to None (ambiguous).
    """
    index: dict[str, Path | None] = {}
    for path in sorted(manual_dir.rglob("*")):
        if path.suffix.lower() not in VIDEO_SUFFIXES or not path.is_file():
            continue
        parts = path.relative_to(manual_dir).with_suffix("").parts
        for i in range(len(parts)):
            tail = "/".join(parts[i:])
            index[tail] = path if index.get(tail, path) == path else None
    return index


def find_video(index: dict[str, Path | None], relative: str, min_parts: int = 1) -> Path | None:
    """The video for an expected relative path, matching its longest unambiguous tail.

    Tails shorter than `min_parts` components are not tried: Breakfast's `P03_cereals`
    alone does not say which camera.
    """
    parts = Path(relative).with_suffix("").parts
    for i in range(len(parts) - min_parts + 1):
        hit = index.get("/".join(parts[i:]))
        if hit is not None:
            return hit
    return None
