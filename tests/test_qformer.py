"""Q-Former port: parity with transformers' Blip2QFormerModel, loading errors, dtypes."""

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from tolerances import BF16, PARITY

from cmdcl_jax.models.hf_weights import WeightLoadError
from cmdcl_jax.models.qformer import QFormer, QFormerConfig

HF_TINY = dict(
    hidden_size=32,
    num_hidden_layers=3,  # layers 0 and 2 cross-attend, layer 1 does not
    num_attention_heads=4,
    intermediate_size=48,
    cross_attention_frequency=2,
    encoder_hidden_size=24,
    use_qformer_text_input=True,  # its text-branch weights are saved and must be skipped
)
BATCH, QUERIES, CONTEXT = 2, 5, 7


run = nnx.jit(lambda model, queries, context, mask: model(queries, context, context_mask=mask))


def save_hf(directory) -> torch.nn.Module:
    torch.manual_seed(0)
    model = transformers.Blip2QFormerModel(transformers.Blip2QFormerConfig(**HF_TINY))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # every weight random, LayerNorm scales about one
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen) * 0.2
            param.copy_(
                noise + 1.0 if "LayerNorm.weight" in name or name == "layernorm.weight" else noise
            )
    model.eval()
    model.save_pretrained(directory)
    return model


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("qformer")
    return directory, save_hf(directory)


def inputs(seed=0):
    rng = np.random.default_rng(seed)
    queries = rng.normal(size=(BATCH, QUERIES, 32)).astype(np.float32)
    context = rng.normal(size=(BATCH, CONTEXT, 24)).astype(np.float32)
    mask = np.ones((BATCH, CONTEXT), np.int64)
    mask[1, 4:] = 0  # the second sample's context is padded
    return queries, context, mask


def torch_forward(model, queries, context, mask=None) -> np.ndarray:
    with torch.no_grad():
        out = model(
            query_embeds=torch.from_numpy(queries),
            encoder_hidden_states=torch.from_numpy(context),
            encoder_attention_mask=None if mask is None else torch.from_numpy(mask),
        )
    return out.last_hidden_state.numpy()


@pytest.mark.parametrize("masked", [False, True])
def test_matches_transformers(hf_dir, masked):
    directory, hf = hf_dir
    queries, context, mask = inputs()
    mask = mask if masked else None
    expected = torch_forward(hf, queries, context, mask)

    model = QFormer.from_pretrained(directory)
    assert model.layers[1].cross_attn is None and model.layers[2].cross_attn is not None
    got = run(model, jnp.asarray(queries), jnp.asarray(context), mask)

    assert got.shape == expected.shape == (BATCH, QUERIES, 32)
    assert np.abs(expected).mean() > 0.1
    np.testing.assert_allclose(np.asarray(got), expected, **PARITY)


def test_mask_changes_only_the_padded_sample(hf_dir):
    model = QFormer.from_pretrained(hf_dir[0])
    queries, context, mask = inputs()
    full = np.asarray(run(model, jnp.asarray(queries), jnp.asarray(context), None))
    padded = np.asarray(run(model, jnp.asarray(queries), jnp.asarray(context), mask))
    # Sample 0 is unmasked in both runs, but the programs differ (the mask adds a select),
    # so XLA may order the float32 sums differently: a few ulps per sum through 3 layers
    # of outputs up to 4, 1.1e-6 measured; bounded at 1e-5 relative plus 1e-5 absolute.
    np.testing.assert_allclose(padded[0], full[0], rtol=1e-5, atol=1e-5)
    # Masking 3 of its 7 context tokens moves sample 1 far beyond that rounding.
    assert np.abs(padded[1] - full[1]).max() > 1e-2


def test_loads_the_qformer_of_a_full_blip2_checkpoint(tmp_path, hf_dir):
    """A BLIP-2 checkpoint: config under ``qformer_config``, tensors under ``qformer.``."""
    from safetensors.numpy import load_file, save_file

    directory, hf = hf_dir
    tensors = load_file(str(directory / "model.safetensors"))
    blip2 = {f"qformer.{k}": v for k, v in tensors.items()}
    blip2["query_tokens"] = np.zeros((1, QUERIES, 32), np.float32)
    blip2["vision_model.post_layernorm.weight"] = np.ones(24, np.float32)
    save_file(blip2, str(tmp_path / "model.safetensors"))
    qformer_config = json.loads((directory / "config.json").read_text())
    del qformer_config["encoder_hidden_size"]  # Blip2Config derives it from the vision tower
    config = {
        "model_type": "blip-2",
        "qformer_config": qformer_config,
        "vision_config": {"hidden_size": 24},
    }
    (tmp_path / "config.json").write_text(json.dumps(config))

    model = QFormer.from_pretrained(tmp_path)
    assert model.cfg.encoder_hidden_size == 24
    queries, context, _ = inputs(seed=1)
    got = run(model, jnp.asarray(queries), jnp.asarray(context), None)
    np.testing.assert_allclose(np.asarray(got), torch_forward(hf, queries, context), **PARITY)


def test_random_init_matches_hf_convention():
    model = QFormer(QFormerConfig.tiny(), rngs=nnx.Rngs(0))
    kernel = np.asarray(model.layers[0].cross_attn.key.kernel[...])
    assert kernel.shape == (32, 32)
    assert 0.015 < kernel.std() < 0.025  # N(0, 0.02): the std of 1024 draws is 0.02 +- 2%
    assert not np.asarray(model.layers[0].self_attn.query.bias[...]).any()
    assert (np.asarray(model.input_norm.scale[...]) == 1).all()
    assert model.layers[1].cross_attn is None


def test_bfloat16_compute_close_to_float32(hf_dir):
    queries, context, mask = inputs()
    args = (jnp.asarray(queries), jnp.asarray(context), mask)
    out32 = np.asarray(run(QFormer.from_pretrained(hf_dir[0]), *args))
    model16 = QFormer.from_pretrained(hf_dir[0], dtype=jnp.bfloat16)
    out16 = run(model16, *args)
    assert out16.dtype == jnp.bfloat16
    assert model16.input_norm.scale[...].dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out16, np.float32), out32, **BF16)


def test_missing_safetensors_names_the_directory(tmp_path, hf_dir):
    shutil.copy(hf_dir[0] / "config.json", tmp_path / "config.json")
    with pytest.raises(WeightLoadError, match="no model.safetensors") as err:
        QFormer.from_pretrained(tmp_path)
    assert str(tmp_path) in str(err.value)


def test_another_architecture_is_refused(tmp_path):
    timesformer = transformers.TimesformerModel(
        transformers.TimesformerConfig(
            image_size=16,
            patch_size=8,
            num_frames=2,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
        )
    )
    timesformer.save_pretrained(tmp_path)
    with pytest.raises(WeightLoadError) as err:
        QFormer.from_pretrained(tmp_path)
    message = str(err.value)
    assert str(tmp_path / "config.json") in message
    assert "'timesformer'" in message and "blip_2_qformer" in message


def test_shape_mismatch_names_file_and_parameter(tmp_path, hf_dir):
    shutil.copytree(hf_dir[0], tmp_path, dirs_exist_ok=True)
    config = json.loads((tmp_path / "config.json").read_text())
    config["encoder_hidden_size"] = 16
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightLoadError) as err:
        QFormer.from_pretrained(tmp_path)
    message = str(err.value)
    assert str(tmp_path / "model.safetensors") in message
    assert "crossattention.attention." in message and ".cross_attn." in message
    assert "(16, 32)" in message  # what the edited config expects
