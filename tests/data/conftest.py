"""Fixtures for the data tests: tiny manual dirs in the real formats of docs/data.md."""

import json
from pathlib import Path

import numpy as np
import pytest
from absl import flags

from cmdcl_jax.data import builders
from cmdcl_jax.data.video import write_video

# Grain's worker processes read absl flags.
flags.FLAGS.mark_as_parsed()

NUM_STORED = 4


def _write_ramp(path: Path, num_frames: int = 20) -> None:
    """A 32x48 video whose frame t has brightness 10 t, so sampling can be checked."""
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = np.repeat(np.arange(num_frames, dtype=np.uint8)[:, None, None, None] * 10, 3, -1)
    write_video(str(path), np.broadcast_to(frames, (num_frames, 32, 48, 3)).copy(), fps=15)


def _write_corrupt(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x00\x00\x01\xb3 not a video" * 40)


def write_breakfast(root: Path) -> Path:
    """Breakfast copy: train P03 (cam01), P16 (stereo01 -> stereo/_ch0), P04 (stereo01, with
    the real files' zero-length segments `1-0 SIL` and `15-14 SIL`; and cam01, corrupt),
    P46 (line 3 malformed); test P47 (webcam01), P50 (missing video); P05 has a video but
    no label file."""
    coarse = root / "segmentation_coarse"
    labels = {
        "cereals/P03_cam01_P03_cereals.txt": "1-5 SIL  \n6-15 take_bowl\n16-20 pour_cereals\n",
        "milk/P16_stereo01_P16_milk.txt": "1-4 SIL\n5-18 pour_milk\n19-20 SIL\n",
        "friedegg/P04_stereo01_P04_friedegg.txt": "1-0 SIL\n1-14 crack_egg\n15-14 SIL\n"
        "15-20 fry_egg\n",
        "coffee/P04_cam01_P04_coffee.txt": "1-20 pour_coffee\n",
        "sandwich/P46_cam01_P46_sandwich.txt": "1-4 SIL\n5-12 cut_bun\n13-20 smear butter\n",
        "tea/P47_webcam01_P47_tea.txt": "3-12 add_teabag\n13-18 stir_tea\n",
        "juice/P50_cam02_P50_juice.txt": "1-20 squeeze_orange\n",
    }
    for name, text in labels.items():
        (coarse / name).parent.mkdir(parents=True, exist_ok=True)
        (coarse / name).write_text(text)
    for video in ("P03/cam01/P03_cereals", "P16/stereo/P16_milk_ch0", "P16/stereo/P16_milk_ch1",
                  "P04/stereo/P04_friedegg_ch0", "P46/cam01/P46_sandwich",
                  "P47/webcam01/P47_tea", "P05/cam01/P05_pancake"):  # fmt: skip
        _write_ramp(root / "videos" / f"{video}.avi")
    _write_corrupt(root / "videos" / "P04/cam01/P04_coffee.avi")
    return root


def write_coin(root: Path) -> Path:
    """COIN copy: two training videos, one testing, one testing video missing, one training
    video whose entry has a step id out of range."""

    def entry(task, cls, subset, steps):
        return {
            "recipe_type": task, "class": cls, "subset": subset, "duration": 1.3,
            "start": 0.0, "end": 1.3, "video_url": "https://www.youtube.com/embed/x",
            "annotation": [
                {"id": str(s), "segment": [0.1 * i, 0.1 * i + 0.5], "label": f"step text {s}"}
                for i, s in enumerate(steps)
            ],
        }  # fmt: skip

    database = {
        "vidA": entry(3, "MakeFrenchFries", "training", [12, 15]),
        "vidB": entry(3, "MakeFrenchFries", "training", [15]),
        "vidC": entry(177, "ReplaceLaptopCDDrive", "testing", [778, 1]),
        "vidGone": entry(0, "AssembleBed", "testing", [2]),
        "vidBad": entry(5, "MakeTea", "training", [0]),
    }
    root.mkdir(parents=True, exist_ok=True)
    (root / "COIN.json").write_text(json.dumps({"database": database}))
    for video in ("3/vidA", "3/vidB", "177/vidC", "5/vidBad"):
        _write_ramp(root / "videos" / f"{video}.mp4")
    return root


def write_charades(root: Path) -> Path:
    """Charades copy: quoted fields with commas, an empty and odd action entries, CRLF classes;
    test row EEEEE (line 3) has an action entry without its end time."""
    root.mkdir(parents=True, exist_ok=True)
    classes = "".join(f"c{i:03d} Doing thing number {i}\r\n" for i in range(157))
    (root / "Charades_v1_classes.txt").write_bytes(classes.encode())
    header = (
        "id,subject,scene,quality,relevance,verified,script,objects,descriptions,actions,length"
    )
    train = [
        header,
        'AAAAA,S1,Kitchen,6,7,Yes,"A person, smiling, opens a door.",door;table,"Opens; a door",'
        '"c092 11.90 21.20;c147 0.00 12.60",30.0',
        'BBBBB,S2,Bedroom,5,7,Yes,"Sits.",chair,"Sits down",,25.0',
        'CCCCC,S3,Hallway,5,6,No,"Odd.",,"",c001 5.00 3.00;c156 2.00 99.00;,10.0',
    ]
    test = [
        header,
        'DDDDD,S4,Garage,7,7,Yes,"Walks, then stops.",,"",c000 0.0 1.0,8.0',
        "EEEEE,S5,Garage,7,7,Yes,x,,,c010 1.0,8.0",
    ]
    (root / "Charades_v1_train.csv").write_text("\n".join(train) + "\n")
    (root / "Charades_v1_test.csv").write_text("\n".join(test) + "\n")
    for video in ("AAAAA", "BBBBB", "CCCCC", "DDDDD", "EEEEE"):
        _write_ramp(root / "Charades_v1" / f"{video}.mp4")
    return root


@pytest.fixture(scope="session")
def prepared(tmp_path_factory):
    """Builds the three real fixtures once: dataset -> (data_dir, report)."""
    from cmdcl_jax import prepare

    base = tmp_path_factory.mktemp("real")
    data_dir = str(base / "tfds")
    manual = {
        "breakfast": write_breakfast(base / "breakfast"),
        "coin": write_coin(base / "coin"),
        "charades": write_charades(base / "charades"),
    }
    options = {
        "breakfast": {"encoding": "jpeg", "num_workers": 0},
        "coin": {"encoding": "raw", "num_workers": 2},
        "charades": {"encoding": "zlib", "num_workers": 0},
    }
    return {
        name: (
            data_dir,
            prepare.prepare(name, str(manual[name]), data_dir, num_frames=NUM_STORED,
                            short_side=16, **options[name]),
        )
        for name in manual
    }  # fmt: skip


@pytest.fixture(scope="session")
def kitchen(tmp_path_factory):
    """A small CausalKitchen build: (data_dir, config name)."""
    data_dir = str(tmp_path_factory.mktemp("kitchen"))
    config = builders.build_causal_kitchen(
        data_dir, seed=3, num_train=30, num_val=11, num_test=13, num_frames=8, frame_size=32
    )
    return data_dir, config
