"""Builders and parsers on fixtures in the real formats: labels, splits, skips, errors."""

import pickle
from pathlib import Path

import numpy as np
import pytest
from conftest import NUM_STORED, write_breakfast, write_charades

from cmdcl_jax.data import annotations as ann
from cmdcl_jax.data import pipeline


def _examples(data_dir, dataset, split):
    source = pipeline.load_builder(dataset, data_dir).as_data_source(split)
    return {source[i]["id"].decode(): source[i] for i in range(len(source))}


def test_breakfast_action_order_and_names():
    assert len(ann.BREAKFAST_ACTIONS) == 48
    assert ann.BREAKFAST_ACTIONS[:3] == ("SIL", "add_saltnpepper", "add_teabag")
    assert ann.BREAKFAST_ACTIONS[-1] == "take_topping"
    assert ann.BREAKFAST_ACTIONS.index("stirfry_egg") == 38
    assert ann.breakfast_action_prompt("pour_egg2pan") == "pour egg to pan"
    assert ann.breakfast_action_prompt("put_bunTogether") == "put bun together"


def test_breakfast_labels_splits_and_skips(prepared):
    data_dir, report = prepared["breakfast"]
    train, test = (
        _examples(data_dir, "breakfast", "train"),
        _examples(data_dir, "breakfast", "test"),
    )
    assert set(train) == {"P03_cam01_P03_cereals", "P16_stereo_P16_milk_ch0"}
    assert set(test) == {"P47_webcam01_P47_tea"}
    cereals = train["P03_cam01_P03_cereals"]
    assert cereals["activity"] == 0
    positives = [ann.BREAKFAST_ACTIONS[i] for i in np.flatnonzero(cereals["actions"])]
    assert positives == ["SIL", "pour_cereals", "take_bowl"]
    tea = test["P47_webcam01_P47_tea"]
    assert tea["activity"] == ann.BREAKFAST_ACTIVITIES.index("tea")
    # SIL is positive in every video, also where the file has no SIL segment.
    assert [ann.BREAKFAST_ACTIONS[i] for i in np.flatnonzero(tea["actions"])] == [
        "SIL", "add_teabag", "stir_tea"
    ]  # fmt: skip
    # JPEG frames, F of them, short side 16; the span's frames in order (brightness 10 t).
    assert len(cereals["frames"]) == NUM_STORED
    skipped = {(s["id"], s["reason"].split(":")[0]) for s in report["skipped"]}
    assert skipped == {
        ("P50_cam02_P50_juice", "missing video"),
        ("P04_cam01_P04_coffee", "decode failed"),
        ("P05_pancake", "no label"),
    }
    assert report["skipped_counts"] == {"decode failed": 1, "missing video": 1, "no label": 1}
    assert report["written"] == {"train": 2, "test": 1}
    names = pipeline.class_names("breakfast", "activity", data_dir)
    assert names[ann.BREAKFAST_ACTIVITIES.index("scrambledegg")] == "scrambled egg"
    assert len(pipeline.class_names("breakfast", "actions", data_dir)) == 48


def test_frames_follow_annotated_span(prepared):
    data_dir, _ = prepared["breakfast"]
    tea = _examples(data_dir, "breakfast", "test")["P47_webcam01_P47_tea"]
    from cmdcl_jax.data.transforms import take_frames

    frames = take_frames(tea["frames"], np.arange(NUM_STORED))
    assert frames.shape[1:] == (16, 24, 3)
    brightness = frames.mean(axis=(1, 2, 3)) / 10  # ~ the 0-indexed source frame
    # Span 3-18 (1-indexed) = frames 2..17: segment centres 4, 8, 12, 16 (within codec loss).
    np.testing.assert_allclose(brightness, [4, 8, 12, 16], atol=1.0)


def test_coin_labels_splits_and_missing(prepared):
    data_dir, report = prepared["coin"]
    train, test = _examples(data_dir, "coin", "train"), _examples(data_dir, "coin", "test")
    assert set(train) == {"vidA", "vidB"} and set(test) == {"vidC"}
    assert train["vidA"]["task"] == 3
    assert list(np.flatnonzero(train["vidA"]["step"])) == [11, 14]
    assert train["vidA"]["step"].shape == (778,)
    assert list(np.flatnonzero(test["vidC"]["step"])) == [0, 777]
    assert train["vidA"]["frames"].shape == (NUM_STORED, 16, 24, 3)
    assert [(s["id"], s["reason"]) for s in report["skipped"]] == [("vidGone", "missing video")]
    tasks = pipeline.class_names("coin", "task", data_dir)
    assert len(tasks) == 180 and tasks[3] == "make french fries"
    assert tasks[177] == "replace laptop cd drive"
    steps = pipeline.class_names("coin", "step", data_dir)
    assert len(steps) == 778 and steps[14] == "step text 15" and steps[777] == "step text 778"


def test_charades_labels_quoted_empty_and_odd(prepared):
    data_dir, report = prepared["charades"]
    train = _examples(data_dir, "charades", "train")
    assert set(train) == {"AAAAA", "BBBBB", "CCCCC"}
    assert list(np.flatnonzero(train["AAAAA"]["action"])) == [92, 147]
    assert not train["BBBBB"]["action"].any()  # empty actions: kept, all negative
    assert list(np.flatnonzero(train["CCCCC"]["action"])) == [1, 156]  # end <= start, past end
    assert list(_examples(data_dir, "charades", "test")) == ["DDDDD"]
    assert report["skipped"] == []
    names = pipeline.class_names("charades", "action", data_dir)
    assert names[0] == "Doing thing number 0" and len(names) == 157  # CRLF stripped


def test_malformed_breakfast_line_names_file_and_line(tmp_path):
    root = write_breakfast(tmp_path)
    bad = root / "segmentation_coarse/cereals/P03_cam01_P03_cereals.txt"
    bad.write_text("1-5 SIL\n6-15take_bowl\n")
    with pytest.raises(ann.AnnotationError, match=r"P03_cam01_P03_cereals\.txt:2: expected"):
        ann.breakfast_items(root, test_participants=range(47, 55))
    bad.write_text("1-5 SIL\n6-15 take_spoon\n")
    with pytest.raises(ann.AnnotationError, match=r"\.txt:2: unknown unit action 'take_spoon'"):
        ann.breakfast_items(root, test_participants=range(47, 55))


def test_malformed_charades_entry_names_file_and_line(tmp_path):
    root = write_charades(tmp_path)
    path = root / "Charades_v1_test.csv"
    path.write_text(path.read_text() + "EEEEE,S5,Garage,7,7,Yes,x,,,c010 1.0,8.0\n")
    with pytest.raises(ann.AnnotationError, match=r"Charades_v1_test\.csv:3: bad action entry"):
        ann.charades_items(path, "test")
    classes = root / "Charades_v1_classes.txt"
    classes.write_text("c000 Holding\nbroken line\n")
    with pytest.raises(ann.AnnotationError, match=r"classes\.txt:2: expected 'cNNN name'"):
        ann.charades_classes(classes)


def test_malformed_coin_entry_names_the_key(tmp_path):
    path = tmp_path / "COIN.json"
    path.write_text('{"database": {"vidX": {"recipe_type": 1, "class": "A", "annotation": []}}}')
    with pytest.raises(ann.AnnotationError, match=r"database\['vidX'\]: bad or missing field"):
        ann.coin_items(path)


def test_video_index_needs_camera_for_breakfast(tmp_path):
    for rel in ("x/P03/cam01/P03_tea.avi", "x/P03/cam02/P03_tea.avi", "videos/3/abc.mp4"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    index = ann.index_videos(tmp_path)
    assert ann.find_video(index, "P03/cam02/P03_tea.avi", 2) == tmp_path / "x/P03/cam02/P03_tea.avi"
    assert ann.find_video(index, "P03/webcam01/P03_tea.avi", 2) is None
    assert ann.find_video(index, "elsewhere/abc.mp4") == Path(tmp_path / "videos/3/abc.mp4")


def test_rerun_resumes_from_decoded_cache(tmp_path):
    """An interrupted run leaves decoded videos in the cache and no readable dataset;
    the re-run takes them from the cache and clears it."""
    from cmdcl_jax import prepare
    from cmdcl_jax.data import builders

    root, data_dir = write_charades(tmp_path / "charades"), str(tmp_path / "tfds")
    config = builders.video_config(NUM_STORED, 16, "raw")
    cache = Path(data_dir) / "downloads" / f"charades_{config.name}"
    cache.mkdir(parents=True)
    sentinel = np.full((NUM_STORED, 16, 24, 3), 7, np.uint8)  # not what decoding gives
    (cache / "BBBBB.pkl").write_bytes(pickle.dumps(sentinel))
    (Path(data_dir) / "charades" / config.name / "incomplete.XYZ_1.0.0").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no prepared version"):
        pipeline.load_builder("charades", data_dir)
    prepare.prepare("charades", str(root), data_dir, num_frames=NUM_STORED, short_side=16,
                    encoding="raw")  # fmt: skip
    train = _examples(data_dir, "charades", "train")
    np.testing.assert_array_equal(train["BBBBB"]["frames"], sentinel)
    assert train["AAAAA"]["frames"].mean() > 50  # decoded: the ramp's frames 2..17
    assert not cache.exists()
