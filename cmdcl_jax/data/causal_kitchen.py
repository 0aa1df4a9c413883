"""CausalKitchen: the embedded synthetic benchmark of docs/data.md, generated with NumPy.

A video shows the atomic actions of one activity (recipe) in order, one moving glyph per
action (shape, colour, motion), over a background. Three causal structures are built in:

* sequential causality: activity pairs with the same actions in a different order;
* co-occurring causality: actions that occur in one activity only;
* a visual confounder Z: each activity has a typical background, shown with probability
  `bias` in `train` and `test_iid`, and drawn independently of the activity in
  `test_shifted`;
* a cross-modal bias B: the non-causal action "add salt and pepper" appears in the
  `bias_activity`'s training videos with probability `bias` and in the others' with
  probability 1 - bias; in `test_shifted` it appears with probability 1/2 everywhere.

Glyph shapes are left-right symmetric and motions are flip-invariant, so a horizontal
flip keeps every label.
"""

from __future__ import annotations

import dataclasses

import numpy as np

NONCAUSAL_ACTION = "add salt and pepper"
# (activity, ordered actions). Pairs (0, 1), (2, 3), (4, 5) share their actions in a
# different order; "flip pancake", "toss salad", "squeeze orange" occur in one activity only.
RECIPES = (
    ("make scrambled egg", ("crack egg", "whisk eggs", "butter pan", "stir pan")),
    ("make fried egg", ("butter pan", "crack egg", "stir pan", "whisk eggs")),
    ("make tea", ("boil water", "add tea bag", "pour milk")),
    ("make milk tea", ("pour milk", "boil water", "add tea bag")),
    ("make cereal", ("take bowl", "pour cereal", "pour milk")),
    ("make porridge", ("pour milk", "take bowl", "pour cereal")),
    ("make pancake", ("crack egg", "pour batter", "butter pan", "flip pancake")),
    ("make salad", ("cut vegetables", "toss salad", "take bowl")),
    ("make sandwich", ("slice bread", "spread butter", "cut vegetables")),
    ("make juice", ("cut fruit", "squeeze orange", "pour juice")),
)
SPLITS = ("train", "test_iid", "test_shifted")
_COLOURS = np.array(
    [
        [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
        [145, 30, 180], [70, 240, 240], [240, 50, 230], [250, 250, 250], [0, 0, 0],
    ],
    np.float32,
)  # fmt: skip
_SHAPES = ("disc", "square", "diamond", "cross", "ring", "triangle", "hbar", "vbar")
_MOTIONS = ("sway", "bob", "pulse", "orbit")


@dataclasses.dataclass(frozen=True)
class KitchenSpec:
    """Sizes and biases of a CausalKitchen build.

    Attributes:
        seed: everything is a function of it.
        num_activities: C, the first C recipes of `RECIPES` (at most 10).
        num_train: videos in `train`; `num_test` in each of `test_iid`, `test_shifted`.
        num_test: videos in each test split.
        num_frames: frames per video.
        frame_size: frames are square, this many pixels a side.
        bias: P(typical background) and P(non-causal action) where they are confounded.
        bias_activity: the activity that the non-causal action is biased towards.
    """

    seed: int = 0
    num_activities: int = 8
    num_train: int = 320
    num_test: int = 160
    num_frames: int = 32
    frame_size: int = 64
    bias: float = 0.9
    bias_activity: int = 0

    def __post_init__(self):
        if not 2 <= self.num_activities <= len(RECIPES):
            raise ValueError(f"num_activities={self.num_activities} not in 2..{len(RECIPES)}")
        if not 0.0 <= self.bias <= 1.0:
            raise ValueError(f"bias={self.bias} not in [0, 1]")
        if not 0 <= self.bias_activity < self.num_activities:
            raise ValueError(f"bias_activity={self.bias_activity} not a chosen activity")


def activity_names(spec: KitchenSpec) -> list[str]:
    """Names of the C activities."""
    return [name for name, _ in RECIPES[: spec.num_activities]]


def action_names(spec: KitchenSpec) -> list[str]:
    """The K atomic actions: those of the chosen recipes in first-use order, then B."""
    names: list[str] = []
    for _, steps in RECIPES[: spec.num_activities]:
        names += [s for s in steps if s not in names]
    return [*names, NONCAUSAL_ACTION]


def _glyphs(num_actions: int) -> np.ndarray:
    """Distinct (shape, colour, motion) per action: int [K, 3]."""
    i = np.arange(num_actions)
    return np.stack([i % len(_SHAPES), (i + i // len(_SHAPES)) % len(_COLOURS), i % 4], 1)


def _shape_mask(shape: int, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Inside-test of a unit-radius glyph at coordinates relative to its centre."""
    ay, ax = np.abs(y), np.abs(x)
    name = _SHAPES[shape]
    if name == "disc":
        return y**2 + x**2 <= 1
    if name == "square":
        return (ay <= 0.8) & (ax <= 0.8)
    if name == "diamond":
        return ay + ax <= 1
    if name == "cross":
        return ((ay <= 0.3) & (ax <= 1)) | ((ax <= 0.3) & (ay <= 1))
    if name == "ring":
        return (y**2 + x**2 <= 1) & (y**2 + x**2 >= 0.4)
    if name == "triangle":
        return (y <= 0.8) & (y >= 2 * ax - 1)
    if name == "hbar":
        return (ay <= 0.35) & (ax <= 1)
    return (ax <= 0.35) & (ay <= 1)


def _background(kind: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """Background `kind`: a muted colour with one of three textures, float32 [H, W, 3]."""
    base = 0.35 * _COLOURS[kind % len(_COLOURS)] + 60.0
    yy, xx = np.mgrid[:size, :size]
    period = max(4, size // 8)
    texture = (yy // period, xx // period, (yy // period + xx // period))[kind % 3] % 2
    phase = rng.integers(period)
    texture = np.roll(texture, phase, axis=kind % 2)
    return base[None, None, :] + 25.0 * texture[..., None].astype(np.float32)


def _render(
    steps: list[int],
    background: int,
    spec: KitchenSpec,
    glyphs: np.ndarray,
    rng: np.random.Generator,
) -> np.ndarray:
    """Renders one video: the glyphs of `steps` in order over a background, uint8 [T, S, S, 3]."""
    size, num_frames = spec.frame_size, spec.num_frames
    video = np.broadcast_to(
        _background(background, size, rng), (num_frames, size, size, 3)
    ).copy()  # [T, S, S, 3]
    # Step boundaries: equal shares with jitter, every step at least one frame.
    shares = rng.uniform(0.7, 1.3, len(steps))
    cuts = np.round(np.cumsum(shares) / shares.sum() * num_frames).astype(int)
    starts = np.concatenate([[0], cuts[:-1]])
    grid = (np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1  # [S] in (-1, 1)
    for step, start, stop in zip(steps, starts, np.maximum(cuts, starts + 1), strict=True):
        shape, colour, motion = glyphs[step]
        phase = np.linspace(0, 2 * np.pi, stop - start, endpoint=False) + rng.uniform(0, 6.3)
        cy, cx = rng.uniform(-0.15, 0.15, 2)
        radius = np.full(stop - start, 0.3)
        if _MOTIONS[motion] == "sway":
            cx = cx + 0.4 * np.sin(phase)
        elif _MOTIONS[motion] == "bob":
            cy = cy + 0.4 * np.sin(phase)
        elif _MOTIONS[motion] == "pulse":
            radius = 0.3 + 0.15 * np.sin(phase)
        else:
            cy, cx = cy + 0.35 * np.sin(phase), cx + 0.35 * np.cos(phase)
        cy = np.broadcast_to(cy, radius.shape)[:, None, None]  # [t, 1, 1]
        cx = np.broadcast_to(cx, radius.shape)[:, None, None]
        r = radius[:, None, None]
        mask = _shape_mask(shape, (grid[None, :, None] - cy) / r, (grid[None, None, :] - cx) / r)
        video[start:stop][mask] = _COLOURS[colour]  # mask [t, S, S]
    # A per-video brightness shift, not per-pixel noise, so that the shards compress well.
    return np.clip(video + rng.uniform(-20, 20), 0, 255).astype(np.uint8)


def generate(spec: KitchenSpec, split: str):
    """Yields the examples of one split, deterministic in (spec, split).

    Yields:
        (key, example) with example keys `frames` uint8 [T, S, S, 3], `activity` int,
        `actions` sorted positive action ids, `background` int.
    """
    if split not in SPLITS:
        raise ValueError(f"split {split!r} not in {SPLITS}")
    rng = np.random.default_rng([spec.seed, SPLITS.index(split)])
    actions = action_names(spec)
    glyphs = _glyphs(len(actions))
    noncausal = len(actions) - 1
    shifted = split == "test_shifted"
    count = spec.num_train if split == "train" else spec.num_test
    for i in range(count):
        activity = int(rng.integers(spec.num_activities))
        if shifted or rng.random() >= spec.bias:
            background = int(rng.integers(spec.num_activities))
        else:
            background = activity
        if shifted:
            p_noncausal = 0.5
        else:
            p_noncausal = spec.bias if activity == spec.bias_activity else 1 - spec.bias
        steps = [actions.index(s) for s in RECIPES[activity][1]]
        if rng.random() < p_noncausal:
            steps.insert(int(rng.integers(len(steps) + 1)), noncausal)
        example = {
            "frames": _render(steps, background, spec, glyphs, rng),
            "activity": activity,
            "actions": sorted(set(steps)),
            "background": background,
        }
        yield f"{split}_{i:05d}", example
