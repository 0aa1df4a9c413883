"""The composed CMDCL model on the tiny preset: the four Table 3 variants, forward and grad."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from cmdcl_jax.models.cmdcl import TRAINABLE, CMDCLConfig, build_cmdcl, class_prompts
from cmdcl_jax.models.hf_weights import param_paths
from cmdcl_jax.models.tiny_clip import write_tiny_clip

CLASSES = ["crack egg", "butter pan", "pour milk", "fry pancake", "add salt and pepper"]


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny_clip")
    template = CMDCLConfig.tiny(clip="").prompt_template
    return str(write_tiny_clip(directory, [template, *CLASSES]))


def _video(b=2, l=6, size=32, seed=0):
    return jnp.asarray(
        np.random.default_rng(seed).integers(0, 256, (b, l, size, size, 3)), jnp.uint8
    )


VARIANTS = [(False, False), (True, False), (False, True), (True, True)]


@pytest.mark.parametrize("tci,vci", VARIANTS)
def test_forward_and_gradient_of_every_variant(tiny_clip_dir, tci, vci):
    model = build_cmdcl(CMDCLConfig.tiny(tiny_clip_dir, tci=tci, vci=vci), CLASSES)
    video, labels = _video(), jnp.array([1, 3])
    logits, aux = nnx.jit(lambda m, v: m(v))(model, video)
    b, c, d = 2, len(CLASSES), 32
    assert logits.shape == (b, c) and logits.dtype == jnp.float32
    assert bool(jnp.isfinite(logits).all())
    assert aux["frames_clip"].shape == (b, 6, d)
    assert aux["text"].shape == (b, c, d)
    assert aux["video"].shape == ((b, c, d) if vci else (b, 6, d))
    assert ("scores" in aux) == tci and ("vhat" in aux) == vci

    def loss_fn(model):
        logits, _ = model(video)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    # The optimizer's selection holds no CLIP parameter: no gradient, no optimizer state.
    trainable = {".".join(map(str, k)) for k, _ in nnx.to_flat_state(nnx.state(model, TRAINABLE))}
    assert trainable == {p for p in param_paths(model) if not p.startswith("clip.")}
    # Differentiated with respect to everything, CLIP's gradient is exactly zero and every
    # other parameter gets one.
    grads = nnx.jit(nnx.grad(loss_fn))(model)
    flat = {".".join(map(str, k)): v[...] for k, v in nnx.to_flat_state(grads)}
    assert set(flat) == set(param_paths(model))
    clip = [p for p in flat if p.startswith("clip.")]
    assert clip and all(float(jnp.abs(flat[p]).max()) == 0.0 for p in clip)  # stop_gradient
    no_grad = [p for p in trainable if not float(jnp.abs(flat[p]).max()) > 0]
    assert not no_grad, f"parameters without gradient: {no_grad}"


def test_text_embeddings_start_at_clip_prompts_and_intermediates_are_consistent(tiny_clip_dir):
    from cmdcl_jax.models.clip import Clip
    from cmdcl_jax.models.cmdcl import text_embeddings

    cfg = CMDCLConfig.tiny(tiny_clip_dir)
    model = build_cmdcl(cfg, CLASSES)
    t0 = text_embeddings(
        Clip.from_pretrained(tiny_clip_dir), tiny_clip_dir, class_prompts(cfg, CLASSES)
    )
    # The same float32 computation twice: at most sums of <= 64 terms of size <= 1 taken in
    # another order, 64 eps = 8e-6 relative.
    np.testing.assert_allclose(model.text_embeddings[...], t0, rtol=1e-5, atol=1e-6)
    # A float32 norm over D = 32 and a division: a few eps from 1 (1.2e-7 measured).
    np.testing.assert_allclose(np.linalg.norm(t0, axis=-1), 1.0, rtol=1e-5, atol=1e-6)

    logits, aux = model(_video(), fine_scores=True)
    # Softmax sums over L = 6 (and the D channels' separate softmaxes): (L + 2) eps ~ 1e-6.
    np.testing.assert_allclose(aux["scores"].sum(-1), 1.0, rtol=1e-5, atol=1e-6)
    sf = aux["fine_scores"]  # [B, C, L, D]
    np.testing.assert_allclose(sf.sum(axis=2), 1.0, rtol=1e-5, atol=1e-6)
    # Chunked pooling against the materialised scores: sums over L of terms up to 3 in
    # another order, L eps * 3 ~ 2e-6.
    vhat = jnp.einsum("bcld,bld->bcd", sf, aux["frames_sta"])
    np.testing.assert_allclose(aux["vhat"], vhat, rtol=1e-5, atol=1e-5)


def test_bfloat16_compute_runs_and_stays_close(tiny_clip_dir):
    f32 = build_cmdcl(CMDCLConfig.tiny(tiny_clip_dir), CLASSES)
    bf16 = build_cmdcl(CMDCLConfig.tiny(tiny_clip_dir, dtype="bfloat16"), CLASSES)
    video = _video()
    want, _ = f32(video)
    got, _ = bf16(video)
    assert got.dtype == jnp.float32 and bool(jnp.isfinite(got).all())
    # bfloat16 through CLIP, TimeSformer, STA, Q-Former to logits of size 0.2 (1e-3 measured).
    np.testing.assert_allclose(got, want, rtol=0.05, atol=0.01)
    params = jax.tree.leaves(nnx.state(bf16, nnx.Param))
    assert all(p.dtype == jnp.float32 for p in params)  # parameters stay float32


def test_other_frame_count_and_jit(tiny_clip_dir):
    model = build_cmdcl(CMDCLConfig.tiny(tiny_clip_dir), CLASSES)  # STA sized for 8 frames
    forward = nnx.jit(lambda m, v: m(v)[0])
    for frames in (3, 8, 11):
        logits = forward(model, _video(l=frames))
        assert logits.shape == (2, len(CLASSES)) and bool(jnp.isfinite(logits).all())


def test_qformer_width_must_match_clip(tiny_clip_dir):
    from cmdcl_jax.models.qformer import QFormerConfig

    narrow = QFormerConfig(
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        encoder_hidden_size=16,
    )
    cfg = CMDCLConfig.tiny(tiny_clip_dir, qformer=narrow)
    with pytest.raises(ValueError, match="projection_dim 32"):
        build_cmdcl(cfg, CLASSES)


def test_base_preset_at_paper_scale_abstractly():
    """CLIP ViT-B/16 + TimeSformer-B + STA H=6 + Q-Former on COIN steps, shapes only."""
    from cmdcl_jax.models.clip import ClipConfig, ClipTowerConfig
    from cmdcl_jax.models.cmdcl import CMDCL, Architectures, count_params

    cfg = CMDCLConfig.base()
    arch = Architectures(
        clip=ClipConfig(
            vision=ClipTowerConfig(768, 3072, 12, 12, image_size=224, patch_size=16),
            text=ClipTowerConfig(512, 2048, 12, 8),
            projection_dim=512,
        ),
        timesformer=cfg.timesformer_arch,
        qformer=cfg.qformer,
    )
    model = nnx.eval_shape(lambda: CMDCL(cfg, arch, 778, rngs=nnx.Rngs(0)))
    frozen = count_params(model, nnx.PathContains("clip"))
    trainable = count_params(model, TRAINABLE)
    print(f"\nbase(), C=778: {frozen / 1e6:.1f}M frozen CLIP, {trainable / 1e6:.1f}M trainable")
    assert 85e6 < frozen < 89e6  # ViT-B/16 vision tower plus projection
    # TimeSformer-B 121.3M + STA 6 x 3.15M + Q-Former 2 x 4.2M + h, g 2 x 0.8M + T, head 0.8M
    assert 148e6 < trainable < 155e6
    video = jax.ShapeDtypeStruct((1, 64, 224, 224, 3), jnp.uint8)
    logits = nnx.eval_shape(lambda m, v: m(v)[0], model, video)
    assert logits.shape == (1, 778)


@pytest.mark.parametrize("width", [32, 64])
def test_tiny_weights_are_drawn_at_the_width_scaled_std(tmp_path, width):
    clip = write_tiny_clip(tmp_path, ["{}", "a", "b"], width=width)
    cfg = CMDCLConfig.tiny(str(clip), width=width)
    assert cfg.init_std == pytest.approx(0.02 * np.sqrt(768 / width))
    model = build_cmdcl(cfg, ["a", "b"])
    kernel = model.timesformer.layers[0].mlp.fc1.kernel[...]  # width x 2 width draws
    # The sample std of n normal draws is within 10 % of sigma (>= 6 of its ~1/sqrt(2n)).
    assert float(kernel.std()) == pytest.approx(cfg.init_std, rel=0.1)
    assert float(model.sta.position[...].std()) == pytest.approx(cfg.init_std, rel=0.25)
    assert float(jnp.abs(model.qformer.layers[0].mlp_norm.scale[...] - 1).max()) == 0
    # T is CLIP's prompt embeddings, untouched by the rescaling.
    assert np.allclose(np.linalg.norm(model.text_embeddings[...], axis=-1), 1, atol=1e-5)


def test_dictionary_tci_holding_the_videos_own_bias_is_sample_tci(tiny_clip_dir):
    """Eq. 2 over a one-entry confounder set {b} with P(b) = 1, b the video's own bias,
    is the sample reading T' = h(T, Bias): the same logits from the same parameters."""
    sample = build_cmdcl(CMDCLConfig.tiny(tiny_clip_dir), CLASSES)
    cfg = CMDCLConfig.tiny(tiny_clip_dir, tci_mode="dictionary", num_confounders=1)
    dictionary = build_cmdcl(cfg, CLASSES)
    params = [jax.tree.leaves(nnx.state(m, nnx.Param)) for m in (sample, dictionary)]
    assert all(np.array_equal(a, b) for a, b in zip(*params, strict=True))  # same seed
    video = _video(b=1)
    forward = nnx.jit(lambda m, v: m(v))
    want, aux = forward(sample, video)
    empty_logits, _ = forward(dictionary, video)  # empty dictionary: E_b[b] = 0
    assert not np.allclose(empty_logits, want)
    dictionary.confounders.prototypes[...] = aux["bias"]  # [K=1, C, D]
    dictionary.confounders.frequencies[...] = jnp.ones((1,))
    got, got_aux = forward(dictionary, video)
    # E_b[b] = 1.0 * b is b exactly, and both models then run the same operations.
    np.testing.assert_array_equal(got_aux["text"], aux["text"])
    np.testing.assert_array_equal(got, want)
