"""CausalKitchen: the embedded synthetic benchmark of docs/data.md, generated with NumPy.

A video shows the atomic actions of one activity (recipe) in order, one moving glyph per
action (shape, colour, motion), over a background. Causal structures built in:

* sequential causality: activity pairs with the same actions in a different order;
* co-occurring causality: actions that occur in one activity only;
* a visual confounder Z: activity ``k`` has a typical background ``k``. In the confounded
  splits (``train``, ``test_iid``) a video shows its activity's own background with
  probability ``background_bias`` and one of the other C - 1 otherwise, so
  ``P(background = activity) = background_bias``; ``1 / C`` is unconfounded;
* a cross-modal bias B: the non-causal action "add salt and pepper" appears in videos of
  ``bias_activity`` with probability ``salt_bias`` and in the others' with
  ``1 - salt_bias``; ``1 / 2`` is unconfounded.

The shifted splits (``val_shifted`` for model selection, ``test_shifted`` for reporting;
disjoint videos, one distribution) draw the background uniformly and show the non-causal
action with probability 1/2, whatever the activity.

Labels (activity, background, steps) and pixels come from two random streams per split,
so :func:`sample_labels` draws a split's labels without rendering it.

Glyph shapes are left-right symmetric and motions are flip-invariant, so a horizontal
flip keeps every label.
"""

from __future__ import annotations

import dataclasses
import itertools

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
# Stream index of each split is its position: keep the order when adding splits.
SPLITS = ("train", "test_iid", "test_shifted", "val_shifted")
CONFOUNDED_SPLITS = ("train", "test_iid")
_COLOURS = np.array(
    [
        [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
        [145, 30, 180], [70, 240, 240], [240, 50, 230], [250, 250, 250], [0, 0, 0],
    ],
    np.float32,
)  # fmt: skip
_COLOUR_NAMES = (
    "red", "green", "yellow", "blue", "orange", "purple", "cyan", "magenta", "white", "black",
)  # fmt: skip
_TEXTURE_NAMES = ("banded", "striped", "checked")  # rows, columns, both (see _background)
_SHAPES = ("disc", "square", "diamond", "cross", "ring", "triangle", "hbar", "vbar")
_MOTIONS = ("sway", "bob", "pulse", "orbit")


@dataclasses.dataclass(frozen=True)
class KitchenSpec:
    """Sizes and biases of a CausalKitchen build.

    Attributes:
        seed: everything is a function of it.
        num_activities: C, the first C recipes of `RECIPES` (at most 10).
        num_train: videos in `train`.
        num_val: videos in `val_shifted`.
        num_test: videos in each of `test_iid` and `test_shifted`.
        num_frames: frames per video.
        frame_size: frames are square, this many pixels a side.
        background_bias: P(background is the activity's own) in the confounded splits,
            0..1; 1 / C is unconfounded.
        salt_bias: P(non-causal action | `bias_activity`) in the confounded splits, and
            1 - salt_bias for every other activity, 0..1; 1 / 2 is unconfounded.
        bias_activity: the activity that the non-causal action is biased towards.
    """

    seed: int = 0
    num_activities: int = 8
    num_train: int = 320
    num_val: int = 160
    num_test: int = 160
    num_frames: int = 32
    frame_size: int = 64
    background_bias: float = 0.9
    salt_bias: float = 0.9
    bias_activity: int = 0

    def __post_init__(self):
        if not 2 <= self.num_activities <= len(RECIPES):
            raise ValueError(f"num_activities={self.num_activities} not in 2..{len(RECIPES)}")
        for name in ("background_bias", "salt_bias"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name}={getattr(self, name)} not in [0, 1]")
        if not 0 <= self.bias_activity < self.num_activities:
            raise ValueError(f"bias_activity={self.bias_activity} not a chosen activity")

    def size(self, split: str) -> int:
        """Number of videos in `split`."""
        check_split(split)
        if split == "train":
            return self.num_train
        return self.num_val if split == "val_shifted" else self.num_test


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"CausalKitchen has no split {split!r}; splits: {SPLITS}")


def activity_names(spec: KitchenSpec) -> list[str]:
    """Names of the C activities."""
    return [name for name, _ in RECIPES[: spec.num_activities]]


def action_names(spec: KitchenSpec) -> list[str]:
    """The K atomic actions: those of the chosen recipes in first-use order, then B."""
    names: list[str] = []
    for _, steps in RECIPES[: spec.num_activities]:
        names += [s for s in steps if s not in names]
    return [*names, NONCAUSAL_ACTION]


def recipe_actions(spec: KitchenSpec) -> np.ndarray:
    """0/1 [C, K]: the atomic actions of each activity's recipe."""
    names = action_names(spec)
    table = np.zeros((spec.num_activities, len(names)), np.int64)
    for a, (_, steps) in enumerate(RECIPES[: spec.num_activities]):
        table[a, [names.index(s) for s in steps]] = 1
    return table


def background_names(spec: KitchenSpec) -> list[str]:
    """Words for the C backgrounds (background k is activity k's typical one): its colour
    and texture, e.g. "red banded"."""
    return [
        f"{_COLOUR_NAMES[k % len(_COLOURS)]} {_TEXTURE_NAMES[k % 3]}"
        for k in range(spec.num_activities)
    ]


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
) -> tuple[np.ndarray, np.ndarray]:
    """Renders one video: the glyphs of `steps` in order over a background.

    Returns:
        (uint8 [T, S, S, 3] frames, int [T] the action id each frame shows).
    """
    size, num_frames = spec.frame_size, spec.num_frames
    video = np.broadcast_to(
        _background(background, size, rng), (num_frames, size, size, 3)
    ).copy()  # [T, S, S, 3]
    # Step boundaries: equal shares with jitter, every step at least one frame.
    shares = rng.uniform(0.7, 1.3, len(steps))
    cuts = np.round(np.cumsum(shares) / shares.sum() * num_frames).astype(int)
    starts = np.concatenate([[0], cuts[:-1]])
    grid = (np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1  # [S] in (-1, 1)
    frame_action = np.zeros(num_frames, np.int64)
    for step, start, stop in zip(steps, starts, np.maximum(cuts, starts + 1), strict=True):
        frame_action[start:stop] = step  # a later step draws over an overlapping frame
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
    return np.clip(video + rng.uniform(-20, 20), 0, 255).astype(np.uint8), frame_action


def background_probs(spec: KitchenSpec, split: str) -> np.ndarray:
    """P(background | activity) of a split: float [C, C], rows the activities."""
    check_split(split)
    c = spec.num_activities
    if split not in CONFOUNDED_SPLITS:
        return np.full((c, c), 1 / c)
    other = (1 - spec.background_bias) / (c - 1)
    return np.where(np.eye(c, dtype=bool), spec.background_bias, other)


def salt_probs(spec: KitchenSpec, split: str) -> np.ndarray:
    """P(non-causal action shown | activity) of a split: float [C]."""
    check_split(split)
    if split not in CONFOUNDED_SPLITS:
        return np.full(spec.num_activities, 0.5)
    probs = np.full(spec.num_activities, 1 - spec.salt_bias)
    probs[spec.bias_activity] = spec.salt_bias
    return probs


@dataclasses.dataclass(frozen=True)
class SplitLabels:
    """The labels of one split, in generation order: activity, background [N] int, and
    per video its steps (action ids, in the order shown)."""

    activity: np.ndarray
    background: np.ndarray
    steps: list[list[int]]


def sample_labels(spec: KitchenSpec, split: str) -> SplitLabels:
    """Draws the labels of `split` (no rendering), deterministic in (spec, split)."""
    rng = np.random.default_rng([spec.seed, SPLITS.index(split), 0])
    actions = action_names(spec)
    noncausal = len(actions) - 1
    background_p, salt_p = background_probs(spec, split), salt_probs(spec, split)
    n = spec.size(split)
    activity = rng.integers(spec.num_activities, size=n)
    cdf = np.cumsum(background_p, axis=1)[activity]  # [N, C]
    background = np.minimum((rng.random((n, 1)) >= cdf).sum(1), spec.num_activities - 1)
    steps = []
    for a in activity:
        video = [actions.index(s) for s in RECIPES[a][1]]
        if rng.random() < salt_p[a]:
            video.insert(int(rng.integers(len(video) + 1)), noncausal)
        steps.append(video)
    return SplitLabels(activity, background, steps)


def order_blind_ceiling(spec: KitchenSpec, split: str) -> float:
    """Best expected activity accuracy of a classifier that sees everything but the order.

    It sees the set of actions shown (the salt action included), the background, and
    the frames' content, but not the order of the actions: activities with the same
    action set are told apart by the background and the non-causal action alone, with
    the Bayes rule under the split's distribution (uniform activity prior).
    """
    recipes = RECIPES[: spec.num_activities]
    groups: dict[frozenset, list[int]] = {}
    for a, (_, steps) in enumerate(recipes):
        groups.setdefault(frozenset(steps), []).append(a)
    background_p, salt_p = background_probs(spec, split), salt_probs(spec, split)
    ceiling = 0.0
    for members in groups.values():
        for z, salt in itertools.product(range(spec.num_activities), (True, False)):
            joint = [background_p[a, z] * (salt_p[a] if salt else 1 - salt_p[a]) for a in members]
            ceiling += max(joint) / spec.num_activities
    return ceiling


def render_split(spec: KitchenSpec, split: str):
    """Yields the videos of one split in order, deterministic in (spec, split).

    Yields:
        (frames uint8 [T, S, S, 3], the action id shown in each frame int [T]).
    """
    labels = sample_labels(spec, split)
    glyphs = _glyphs(len(action_names(spec)))
    rng = np.random.default_rng([spec.seed, SPLITS.index(split), 1])
    for steps, background in zip(labels.steps, labels.background, strict=True):
        yield _render(steps, int(background), spec, glyphs, rng)


def example_key(split: str, i: int) -> str:
    """The key (and ``id``) of the split's i-th generated video."""
    return f"{split}_{i:05d}"


def generate(spec: KitchenSpec, split: str):
    """Yields the examples of one split, deterministic in (spec, split).

    Yields:
        (key, example) with example keys `frames` uint8 [T, S, S, 3], `activity` int,
        `actions` sorted positive action ids, `background` int.
    """
    labels = sample_labels(spec, split)
    for i, (frames, _) in enumerate(render_split(spec, split)):
        example = {
            "frames": frames,
            "activity": int(labels.activity[i]),
            "actions": sorted(set(labels.steps[i])),
            "background": int(labels.background[i]),
        }
        yield example_key(split, i), example


def frame_actions(spec: KitchenSpec, split: str) -> dict[str, np.ndarray]:
    """The action each stored frame shows, by example key: int [T] each (renders the split)."""
    return {example_key(split, i): shown for i, (_, shown) in enumerate(render_split(spec, split))}
