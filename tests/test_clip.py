"""CLIP port: parity with transformers' CLIPModel, the tiny CLIP round trip, bad checkpoints."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from tolerances import PARITY
from transformers import AutoTokenizer, CLIPConfig, CLIPModel

from cmdcl_jax import sharding
from cmdcl_jax.models.clip import Clip
from cmdcl_jax.models.hf_weights import WeightLoadError
from cmdcl_jax.models.tiny_clip import write_tiny_clip


def _torch_clip(hidden_act="quick_gelu", eos_token_id=98) -> CLIPModel:
    torch.manual_seed(0)
    tower = dict(
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        hidden_act=hidden_act,
    )
    cfg = CLIPConfig(
        text_config=dict(
            **tower,
            vocab_size=99,
            max_position_embeddings=16,
            eos_token_id=eos_token_id,
            bos_token_id=1,
            pad_token_id=0,
        ),
        vision_config=dict(**tower, image_size=32, patch_size=8),
        projection_dim=24,
    )
    model = CLIPModel(cfg).eval()
    with torch.no_grad():  # random everything, LayerNorm and embeddings included
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model


@pytest.mark.parametrize("hidden_act,eos_token_id", [("quick_gelu", 98), ("gelu", 2)])
def test_image_and_text_features_match_transformers(tmp_path, hidden_act, eos_token_id):
    torch_model = _torch_clip(hidden_act, eos_token_id)
    torch_model.save_pretrained(tmp_path)
    model = Clip.from_pretrained(tmp_path)

    pixels = np.random.default_rng(0).normal(size=(3, 3, 32, 32)).astype(np.float32)
    # Padded batch: the second row ends on its EOS; pooling must find it, not the padding.
    ids = np.array([[1, 5, 7, 98, 0, 0], [1, 9, 3, 4, 6, 98]])
    mask = (np.arange(6) < np.array([[4], [6]])).astype(np.int64)
    with torch.no_grad():
        want_image = torch_model.get_image_features(pixel_values=torch.tensor(pixels))
        want_text = torch_model.get_text_features(
            input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)
        )
    got_image = model.vision(jnp.asarray(pixels.transpose(0, 2, 3, 1)))
    got_text = model.text(jnp.asarray(ids), jnp.asarray(mask))
    np.testing.assert_allclose(got_image, want_image.pooler_output.numpy(), **PARITY)
    np.testing.assert_allclose(got_text, want_text.pooler_output.numpy(), **PARITY)


def test_text_longer_than_the_position_table_names_the_limit(tmp_path):
    _torch_clip().save_pretrained(tmp_path)  # max_position_embeddings=16
    model = Clip.from_pretrained(tmp_path)
    assert model.text(jnp.ones((1, 16), jnp.int32)).shape == (1, 24)
    with pytest.raises(ValueError, match="17 tokens is longer than .* max_position_embeddings=16"):
        model.text(jnp.ones((1, 17), jnp.int32))


def test_tiny_clip_round_trips_through_transformers(tmp_path):
    texts = ["a video of a person {}.", "crack egg", "butter pan"]
    write_tiny_clip(tmp_path, texts)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    batch = tokenizer(
        ["a video of a person crack egg.", "butter pan"], padding=True, return_tensors="np"
    )
    assert not (batch["input_ids"] == tokenizer.unk_token_id).any()  # vocabulary covers them

    ours = Clip.from_pretrained(tmp_path).text(
        jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"])
    )
    reference = CLIPModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        want = reference.get_text_features(
            input_ids=torch.tensor(batch["input_ids"]),
            attention_mask=torch.tensor(batch["attention_mask"]),
        ).pooler_output.numpy()
    np.testing.assert_allclose(ours, want, **PARITY)


def test_missing_weights_file_names_the_directory(tmp_path):
    _torch_clip().save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(WeightLoadError, match="no model.safetensors"):
        Clip.from_pretrained(tmp_path)


def test_another_architecture_is_refused(tmp_path):
    _torch_clip().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["model_type"] = "timesformer"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightLoadError, match=r"config\.json: model_type 'timesformer'"):
        Clip.from_pretrained(tmp_path)


def test_shape_mismatch_names_file_and_parameter(tmp_path):
    _torch_clip().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["projection_dim"] = 16
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightLoadError) as err:
        Clip.from_pretrained(tmp_path)
    message = str(err.value)
    assert "model.safetensors" in message and "projection.kernel" in message
    assert "(24, 32)" in message and "(32, 16)" in message


def test_missing_tensor_is_never_left_random(tmp_path):
    from safetensors.numpy import load_file, save_file

    _torch_clip().save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["vision_model.encoder.layers.1.mlp.fc2.bias"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(WeightLoadError, match=r"vision\.layers\.1\.mlp\.fc2\.bias"):
        Clip.from_pretrained(tmp_path)


def test_hub_id_on_an_offline_machine_explains_what_to_pass(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightLoadError, match="save_pretrained"):
        Clip.from_pretrained("no-such-org/no-such-clip")


def test_pytorch_bin_checkpoint_reads_only_with_torch(tmp_path, monkeypatch):
    torch_model = _torch_clip()
    torch_model.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    torch.save(torch_model.state_dict(), tmp_path / "pytorch_model.bin")
    pixels = np.random.default_rng(1).normal(size=(2, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        want = torch_model.get_image_features(pixel_values=torch.tensor(pixels)).pooler_output
    got = Clip.from_pretrained(tmp_path).vision(jnp.asarray(pixels.transpose(0, 2, 3, 1)))
    np.testing.assert_allclose(got, want.numpy(), **PARITY)

    monkeypatch.setitem(__import__("sys").modules, "torch", None)  # as if not installed
    with pytest.raises(WeightLoadError, match=r"pytorch_model\.bin: a PyTorch pickle needs"):
        Clip.from_pretrained(tmp_path)


def test_sharded_load_places_each_parameter_and_computes_the_same(tmp_path):
    _torch_clip().save_pretrained(tmp_path)
    mesh = sharding.make_mesh(fsdp=8)
    sharded = Clip.from_pretrained(
        tmp_path, place=lambda shape: sharding.param_sharding(shape, mesh, min_size=256)
    )
    split = [x for x in jax.tree.leaves(nnx.state(sharded)) if "fsdp" in tuple(x.sharding.spec)]
    assert split and all(len(x.addressable_shards) == 8 for x in split)
    assert all(x.addressable_shards[0].data.size * 8 == x.size for x in split)
    pixels = jnp.asarray(np.random.default_rng(0).normal(size=(2, 32, 32, 3)), jnp.float32)
    want = Clip.from_pretrained(tmp_path).vision(pixels)
    # The same sums, reduced across devices in another order: float32 rounding only.
    np.testing.assert_allclose(sharded.vision(pixels), want, **PARITY)


# openai/clip-vit-base-patch16's shapes (its config.json), given here: nothing is downloaded.
VIT_B16 = dict(
    text_config=dict(
        hidden_size=512,
        intermediate_size=2048,
        num_hidden_layers=12,
        num_attention_heads=8,
        vocab_size=49408,
        max_position_embeddings=77,
    ),
    vision_config=dict(
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        image_size=224,
        patch_size=16,
    ),
    projection_dim=512,
)

# Run in a fresh process: its peak resident memory (VmHWM) after loading, minus the same
# peak before (JAX and the model code imported, the CPU backend up). VmHWM belongs to the
# process's own address space; ru_maxrss would not do, as Linux carries it over from the
# parent (here pytest, holding the PyTorch model) through fork and exec.
_MEASURE_LOAD = """
import json, re, sys
from pathlib import Path
import jax
import numpy as np
from flax import nnx
from safetensors import safe_open
from cmdcl_jax.models.clip import Clip


def peak_rss():
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"VmHWM:\\s*(\\d+) kB", status).group(1)) * 1024


directory = sys.argv[1]
jax.numpy.zeros(1).block_until_ready()
before = peak_rss()
clip = Clip.from_pretrained(directory)
jax.block_until_ready(nnx.state(clip))
after = peak_rss()
with safe_open(f"{directory}/model.safetensors", framework="np") as f:
    want = f.get_tensor("visual_projection.weight").T
same = bool(np.array_equal(clip.vision.projection.kernel[...], want))
print(json.dumps({"before": before, "growth": after - before, "same": same}))
"""


def test_loading_vit_b16_peaks_near_the_checkpoint_size(tmp_path):
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(**VIT_B16)).save_pretrained(tmp_path)
    size = (tmp_path / "model.safetensors").stat().st_size
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    out = subprocess.run(
        [sys.executable, "-c", _MEASURE_LOAD, str(tmp_path)],
        env=env,
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr
    measured = json.loads(out.stdout.strip().splitlines()[-1])
    growth = measured["growth"]
    print(f"\nViT-B/16 CLIP: file {size / 2**20:.0f} MiB, load peak +{growth / 2**20:.0f} MiB")
    assert measured["same"]
    # The parameters are the file's float32 tensors, so the loaded model alone is 1.0x the
    # file; one tensor in flight adds at most the largest (the 49408 x 512 token table,
    # 0.17x). Measured 1.16x; reading the whole file beside the model would be 2x.
    assert growth <= 1.3 * size
