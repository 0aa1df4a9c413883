"""TimeSformer port: parity with transformers' PyTorch model, weight-loading errors, dtypes."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from tolerances import BF16, PARITY

from cmdcl_jax.models.hf_weights import WeightLoadError
from cmdcl_jax.models.timesformer import Timesformer, TimesformerConfig

HF_TINY = dict(
    image_size=32,
    patch_size=8,
    num_channels=3,
    num_frames=4,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
)


def randomise(model: torch.nn.Module, seed: int) -> None:
    """Every parameter random, LayerNorm scales about one, so that nothing is trivially 0/1."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen) * 0.2
            is_norm_scale = "norm" in name and name.endswith("weight")
            param.copy_(noise + 1.0 if is_norm_scale else noise)


def save_hf(cls_name: str, directory) -> torch.nn.Module:
    torch.manual_seed(0)
    model = getattr(transformers, cls_name)(transformers.TimesformerConfig(**HF_TINY))
    randomise(model, seed=1)
    model.eval()
    model.save_pretrained(directory)
    return model


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("timesformer")
    return directory, save_hf("TimesformerModel", directory)


# Jitted: one compile is far faster on CPU than op-by-op dispatch.
encode = nnx.jit(lambda model, pixels: model(pixels))


def hf_order(tokens, cls) -> np.ndarray:
    """Our (tokens [B, T, N, D], cls [B, D]) as HF's [B, 1 + N*T, D] (patch-major, frame-minor)."""
    b, t, n, d = tokens.shape
    patches = np.asarray(tokens, np.float32).transpose(0, 2, 1, 3).reshape(b, n * t, d)
    return np.concatenate([np.asarray(cls, np.float32)[:, None], patches], axis=1)


def video(batch=2, frames=4, size=32, seed=0) -> np.ndarray:
    shape = (batch, frames, size, size, 3)
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def torch_forward(model, pixels: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        out = model(pixel_values=torch.from_numpy(pixels.transpose(0, 1, 4, 2, 3).copy()))
    return out.last_hidden_state.numpy()


@pytest.mark.parametrize("cls_name", ["TimesformerModel", "TimesformerForVideoClassification"])
def test_matches_transformers(tmp_path, cls_name):
    hf = save_hf(cls_name, tmp_path)
    base = hf.timesformer if cls_name == "TimesformerForVideoClassification" else hf
    pixels = video()
    expected = torch_forward(base, pixels)

    model = Timesformer.from_pretrained(tmp_path)
    tokens, cls = encode(model, jnp.asarray(pixels))

    assert tokens.shape == (2, 4, 16, 32) and cls.shape == (2, 32)
    assert expected.shape == (2, 1 + 16 * 4, 32)
    assert np.abs(expected).mean() > 0.1  # the comparison is not between near-zeros
    np.testing.assert_allclose(hf_order(tokens, cls), expected, **PARITY)


def test_other_frame_count_and_frame_size(hf_dir):
    model = Timesformer.from_pretrained(hf_dir[0])
    for frames, size in [(7, 32), (2, 32), (4, 48)]:
        tokens, cls = encode(model, jnp.asarray(video(frames=frames, size=size)))
        assert tokens.shape == (2, frames, (size // 8) ** 2, 32)
        assert cls.shape == (2, 32)
        assert bool(jnp.isfinite(tokens).all()) and bool(jnp.isfinite(cls).all())


def test_frame_remainder_is_dropped_as_transformers_does(hf_dir):
    """37x35 frames, 8px patches: the checkpoint's 4x4 grid; the last 5 rows and 3 columns
    fall outside every patch, in transformers' strided convolution and here."""
    directory, hf = hf_dir
    pixels = np.random.default_rng(3).normal(size=(2, 4, 37, 35, 3)).astype(np.float32)
    expected = torch_forward(hf, pixels)
    tokens, cls = encode(Timesformer.from_pretrained(directory), jnp.asarray(pixels))
    assert tokens.shape == (2, 4, 16, 32) and expected.shape == (2, 1 + 16 * 4, 32)
    assert np.abs(expected).mean() > 0.1
    np.testing.assert_allclose(hf_order(tokens, cls), expected, **PARITY)
    with pytest.raises(ValueError, match="frame size 7x35 is smaller than the patch size 8"):
        encode(Timesformer.from_pretrained(directory), jnp.asarray(pixels[:, :, :7]))


def test_time_embeddings_interpolate_linearly(hf_dir):
    model = Timesformer.from_pretrained(hf_dir[0])
    table = np.asarray(model.time_embed[...][0])  # [4, D]
    doubled = np.asarray(model._frame_times(8))  # [8, D]
    # Half-pixel centres: new frame 2k+1 sits at old position k + 0.25. One float32 blend
    # of two entries of size < 1: a few ulps (1e-7) apart from the same blend in NumPy.
    blend = {"rtol": 1e-6, "atol": 1e-6}
    np.testing.assert_allclose(doubled[1], 0.75 * table[0] + 0.25 * table[1], **blend)
    np.testing.assert_allclose(doubled[0], table[0], **blend)
    np.testing.assert_array_equal(np.asarray(model._frame_times(4)), table)  # the table itself


def test_bfloat16_compute_close_to_float32(hf_dir):
    pixels = jnp.asarray(video())
    tokens32, cls32 = encode(Timesformer.from_pretrained(hf_dir[0]), pixels)
    model16 = Timesformer.from_pretrained(hf_dir[0], dtype=jnp.bfloat16)
    tokens16, cls16 = encode(model16, pixels)
    assert tokens16.dtype == jnp.bfloat16 and cls16.dtype == jnp.bfloat16
    assert model16.pos_embed[...].dtype == jnp.float32
    np.testing.assert_allclose(hf_order(tokens16, cls16), hf_order(tokens32, cls32), **BF16)


def assert_same_values_and_gradients(**options):
    """A tiny TimeSformer built with ``options`` against the default one: loss and every
    gradient of a quadratic loss on one clip; returns the default's gradients."""
    cfg = TimesformerConfig.tiny()
    pixels = jnp.asarray(video())

    def loss(model):
        tokens, cls = model(pixels)
        return jnp.mean(tokens**2) + jnp.mean(cls**2)

    value_and_grad = nnx.jit(nnx.value_and_grad(loss))
    loss_a, grads_a = value_and_grad(Timesformer(cfg, rngs=nnx.Rngs(0)))
    loss_b, grads_b = value_and_grad(Timesformer(cfg, **options, rngs=nnx.Rngs(0)))
    # The same float32 operations, fused and summed in other orders (sums of up to 64
    # terms): 64 eps (8e-6) of the largest gradients (0.3), 2e-6 at most; a wrong scale,
    # head split or recomputation moves them by their own size.
    np.testing.assert_allclose(loss_a, loss_b, rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    return grads_a


def test_remat_gives_same_values_and_gradients():
    grads = assert_same_values_and_gradients(remat=True)
    assert float(jnp.abs(grads["time_embed"][...]).sum()) > 0


@pytest.mark.parametrize("remat", [False, True])  # the CPU's barriers inside a remat block
def test_explicit_attention_matches_the_default(remat):
    """The einsums against the default ("auto": on a CPU, XLA's ``dot_product_attention`` under
    32 keys, as here)."""
    assert_same_values_and_gradients(attention="explicit", remat=remat)


def test_unknown_attention_is_refused():
    with pytest.raises(ValueError, match="attention 'flash'"):
        Timesformer(TimesformerConfig.tiny(), attention="flash", rngs=nnx.Rngs(0))


def test_normalize_uses_preprocessor_config(tmp_path, hf_dir):
    shutil.copytree(hf_dir[0], tmp_path, dirs_exist_ok=True)
    pre = {"image_mean": [0.5, 0.4, 0.3], "image_std": [0.25, 0.2, 0.1]}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(pre))
    model = Timesformer.from_pretrained(tmp_path)
    assert model.cfg.image_mean == (0.5, 0.4, 0.3)
    out = model.normalize(jnp.full((1, 1, 1, 1, 3), 255, jnp.uint8))
    # (1 - mean) / std in float32: three roundings of values up to 7, under 1e-6 relative.
    np.testing.assert_allclose(np.asarray(out).ravel(), [2.0, 3.0, 7.0], rtol=1e-6, atol=1e-6)
    # Without a processor file: the K400 processor's values.
    assert Timesformer.from_pretrained(hf_dir[0]).cfg.image_std == (0.225, 0.225, 0.225)


def test_missing_safetensors_names_the_directory(tmp_path, hf_dir):
    shutil.copy(hf_dir[0] / "config.json", tmp_path / "config.json")
    with pytest.raises(WeightLoadError, match="no model.safetensors") as err:
        Timesformer.from_pretrained(tmp_path)
    assert str(tmp_path) in str(err.value)


def test_another_architecture_is_refused(tmp_path):
    qformer = transformers.Blip2QFormerModel(
        transformers.Blip2QFormerConfig(
            hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
        )
    )
    qformer.save_pretrained(tmp_path)
    with pytest.raises(WeightLoadError) as err:
        Timesformer.from_pretrained(tmp_path)
    message = str(err.value)
    assert str(tmp_path / "config.json") in message
    assert "'blip_2_qformer'" in message and "timesformer" in message


def test_shape_mismatch_names_file_and_parameter(tmp_path, hf_dir):
    shutil.copytree(hf_dir[0], tmp_path, dirs_exist_ok=True)
    config = json.loads((tmp_path / "config.json").read_text())
    config["intermediate_size"] = 48
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightLoadError) as err:
        Timesformer.from_pretrained(tmp_path)
    message = str(err.value)
    assert str(tmp_path / "model.safetensors") in message
    assert "intermediate.dense" in message and ".mlp.fc1." in message
    assert "(64," in message or "(32, 64)" in message


def test_unsupported_attention_type_names_config_file(tmp_path, hf_dir):
    shutil.copytree(hf_dir[0], tmp_path, dirs_exist_ok=True)
    config = json.loads((tmp_path / "config.json").read_text())
    config["attention_type"] = "joint_space_time"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightLoadError) as err:
        Timesformer.from_pretrained(tmp_path)
    assert str(tmp_path / "config.json") in str(err.value)
    assert "'joint_space_time'" in str(err.value)


def test_presets():
    assert TimesformerConfig.base().grid == 14
    tiny = TimesformerConfig.tiny()
    model = Timesformer(tiny, rngs=nnx.Rngs(0))
    tokens, cls = encode(model, jnp.zeros((1, tiny.num_frames, 32, 32, 3)))
    assert tokens.shape == (1, tiny.num_frames, tiny.grid**2, tiny.hidden_size)
    assert cls.shape == (1, tiny.hidden_size)
