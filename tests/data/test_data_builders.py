"""Builders and parsers on fixtures in the real formats: labels, splits, skips, errors."""

import json
import pickle
import re
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
    assert set(train) == {
        "P03_cam01_P03_cereals", "P16_stereo_P16_milk_ch0", "P04_stereo_P04_friedegg_ch0"
    }  # fmt: skip
    assert set(test) == {"P47_webcam01_P47_tea"}
    cereals = train["P03_cam01_P03_cereals"]
    assert cereals["activity"] == 0
    positives = [ann.BREAKFAST_ACTIONS[i] for i in np.flatnonzero(cereals["actions"])]
    assert positives == ["SIL", "pour_cereals", "take_bowl"]
    friedegg = train["P04_stereo_P04_friedegg_ch0"]  # its zero-length segments left out
    positives = [ann.BREAKFAST_ACTIONS[i] for i in np.flatnonzero(friedegg["actions"])]
    assert positives == ["SIL", "crack_egg", "fry_egg"]
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
        ("P46_cam01_P46_sandwich", "bad annotation"),  # its video is not "no label"
    }
    (bad,) = [s for s in report["skipped"] if s["reason"].startswith("bad annotation")]
    assert re.search(r"P46_cam01_P46_sandwich\.txt:3: expected 'start-end label'", bad["reason"])
    assert bad["split"] == "train" and bad["video"] == "P46/cam01/P46_sandwich.avi"
    assert report["skipped_counts"] == {
        "bad annotation": 1, "decode failed": 1, "missing video": 1, "no label": 1
    }  # fmt: skip
    assert report["written"] == {"train": 3, "test": 1}
    names = pipeline.class_names("breakfast", "activity", data_dir)
    assert names[ann.BREAKFAST_ACTIVITIES.index("scrambledegg")] == "scrambled egg"
    assert len(pipeline.class_names("breakfast", "actions", data_dir)) == 48


def test_breakfast_zero_length_segments_are_left_out(tmp_path):
    """The real files' `start-(start-1)` segments (P06_cam01_P06_coffee line 6,
    P04_stereo01_P04_friedegg line 1) hold no frame; the others parse as written."""
    coarse = tmp_path / "segmentation_coarse"
    (coarse / "coffee").mkdir(parents=True)
    (coarse / "friedegg").mkdir()
    coffee = coarse / "coffee/P06_cam01_P06_coffee.txt"
    coffee.write_text("1-31 SIL\n32-120 take_cup\n121-300 pour_coffee\n301-390 pour_milk\n"
                      "391-476 stir_coffee\n477-476 SIL\n")  # fmt: skip
    friedegg = coarse / "friedegg/P04_stereo01_P04_friedegg.txt"
    friedegg.write_text("1-0 SIL\n1-210 take_eggs\n211-580 crack_egg\n581-1320 fry_egg\n"
                        "1321-1499 put_egg2plate\n1500-1612 SIL\n")  # fmt: skip
    assert ann.parse_breakfast_segments(coffee) == [
        (1, 31, "SIL"), (32, 120, "take_cup"), (121, 300, "pour_coffee"),
        (301, 390, "pour_milk"), (391, 476, "stir_coffee"),
    ]  # fmt: skip
    assert ann.parse_breakfast_segments(friedegg) == [
        (1, 210, "take_eggs"), (211, 580, "crack_egg"), (581, 1320, "fry_egg"),
        (1321, 1499, "put_egg2plate"), (1500, 1612, "SIL"),
    ]  # fmt: skip
    items, bad = ann.breakfast_items(tmp_path, test_participants=range(47, 55))
    assert bad == []
    spans = {item.key: item.span for item in items}
    # 0-indexed, end exclusive: frames 1..476 and 1..1612 of the 1-indexed files.
    assert spans == {"P06_cam01_P06_coffee": (0, 476), "P04_stereo_P04_friedegg_ch0": (0, 1612)}
    friedegg.write_text("1-0 SIL\n1-210 take_eggs\n230-200 crack_egg\n")
    with pytest.raises(ann.AnnotationError, match=r"friedegg\.txt:3: bad frame range 230-200"):
        ann.parse_breakfast_segments(friedegg)


def test_strict_prepare_stops_at_the_malformed_line(tmp_path):
    from cmdcl_jax import prepare

    root = write_breakfast(tmp_path / "breakfast")
    with pytest.raises(ann.AnnotationError, match=r"P46_cam01_P46_sandwich\.txt:3: expected"):
        prepare.prepare("breakfast", str(root), str(tmp_path / "tfds"), num_frames=NUM_STORED,
                        short_side=16, strict=True)  # fmt: skip


def test_frames_follow_annotated_span(prepared):
    data_dir, _ = prepared["breakfast"]
    tea = _examples(data_dir, "breakfast", "test")["P47_webcam01_P47_tea"]
    from cmdcl_jax.data.transforms import take_frames

    frames = take_frames(tea["frames"], np.arange(NUM_STORED))
    assert frames.shape[1:] == (16, 24, 3)
    brightness = frames.mean(axis=(1, 2, 3)) / 10  # ~ the 0-indexed source frame
    # Span 3-18 (1-indexed) = frames 2..17: segment centres 4, 8, 12, 16. Video and JPEG
    # coding move a flat frame's mean by a few levels whatever its brightness (so no
    # relative term; 5 levels measured); the neighbouring frame is 10 levels away.
    np.testing.assert_allclose(brightness, [4, 8, 12, 16], rtol=0, atol=1.0)


def test_coin_labels_splits_and_missing(prepared):
    data_dir, report = prepared["coin"]
    train, test = _examples(data_dir, "coin", "train"), _examples(data_dir, "coin", "test")
    assert set(train) == {"vidA", "vidB"} and set(test) == {"vidC"}
    assert train["vidA"]["task"] == 3
    assert list(np.flatnonzero(train["vidA"]["step"])) == [11, 14]
    assert train["vidA"]["step"].shape == (778,)
    assert list(np.flatnonzero(test["vidC"]["step"])) == [0, 777]
    assert train["vidA"]["frames"].shape == (NUM_STORED, 16, 24, 3)
    skipped = {s["id"]: s["reason"] for s in report["skipped"]}
    assert set(skipped) == {"vidGone", "vidBad"} and skipped["vidGone"] == "missing video"
    assert re.search(r"COIN\.json: database\['vidBad'\]: step id 0 outside", skipped["vidBad"])
    assert skipped["vidBad"].startswith("bad annotation: ")
    tasks = pipeline.class_names("coin", "task", data_dir)
    assert len(tasks) == 180 and tasks[3] == "make french fries"
    assert tasks[177] == "replace laptop cd drive"
    assert tasks[5] == "task 5"  # the malformed entry lends no name
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
    (bad,) = report["skipped"]
    assert (bad["id"], bad["split"]) == ("EEEEE", "test")
    assert re.search(r"^bad annotation: .*Charades_v1_test\.csv:3: bad action entry", bad["reason"])
    names = pipeline.class_names("charades", "action", data_dir)
    assert names[0] == "Doing thing number 0" and len(names) == 157  # CRLF stripped


def test_malformed_breakfast_file_is_reported_and_the_others_kept(tmp_path):
    root = write_breakfast(tmp_path)
    cereals = root / "segmentation_coarse/cereals/P03_cam01_P03_cereals.txt"
    cereals.write_text("1-5 SIL\n6-15 take_spoon\n")
    odd_name = root / "segmentation_coarse/tea/P48_tea_notes.txt"
    odd_name.write_text("1-5 SIL\n")
    items, bad = ann.breakfast_items(root, test_participants=range(47, 55))
    errors = {b.key: str(b.error) for b in bad}
    assert re.search(r"P03_cam01_P03_cereals\.txt:2: unknown unit action 'take_spoon'",
                     errors.pop("P03_cam01_P03_cereals"))  # fmt: skip
    assert re.search(
        r"P46_cam01_P46_sandwich\.txt:3: expected", errors.pop("P46_cam01_P46_sandwich")
    )
    assert re.search(r"P48_tea_notes\.txt: file name is not", errors.pop("P48_tea_notes"))
    assert errors == {}
    assert len(items) == 5 and "P03_cam01_P03_cereals" not in {i.key for i in items}


def test_malformed_charades_row_is_reported_and_the_others_kept(tmp_path):
    root = write_charades(tmp_path)
    path = root / "Charades_v1_train.csv"
    path.write_text(path.read_text() + ",S6,Garage,7,7,Yes,x,,,,8.0\nFFFFF,S6,Garage,7\n")
    items, bad = ann.charades_items(path, "train")
    assert [i.key for i in items] == ["AAAAA", "BBBBB", "CCCCC"]
    assert [(b.key, b.split) for b in bad] == [("", "train"), ("FFFFF", "train")]
    assert re.search(r"Charades_v1_train\.csv:5: empty id", str(bad[0].error))
    assert re.search(r"Charades_v1_train\.csv:6: not as many fields", str(bad[1].error))
    classes = root / "Charades_v1_classes.txt"
    classes.write_text("c000 Holding\nbroken line\n")
    with pytest.raises(ann.AnnotationError, match=r"classes\.txt:2: expected 'cNNN name'"):
        ann.charades_classes(classes)  # no video can be labelled without the class list


def test_malformed_coin_entry_is_reported_and_the_others_kept(tmp_path):
    path = tmp_path / "COIN.json"
    good = {"recipe_type": 2, "class": "CutHair", "subset": "testing", "annotation": []}
    database = {"vidX": {"recipe_type": 1, "class": "A", "annotation": []}, "vidY": good}
    path.write_text(json.dumps({"database": database}))
    items, bad, tasks, _ = ann.coin_items(path)
    assert [i.key for i in items] == ["vidY"] and tasks[2] == "cut hair"
    assert [(b.key, b.split, b.video) for b in bad] == [("vidX", "-", "vidX.mp4")]
    assert re.search(r"COIN\.json: database\['vidX'\]: bad or missing field", str(bad[0].error))
    path.write_text('{"videos": []}')
    with pytest.raises(ann.AnnotationError, match=r"not a COIN\.json with 'database'"):
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
