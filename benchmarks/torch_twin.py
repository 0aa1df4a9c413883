r"""CMDCL in PyTorch, the yardstick of ``benchmarks/train_step.py``.

The frozen CLIP vision tower, the TimeSformer and the Q-Former are transformers' own
``CLIPVisionModelWithProjection``, ``TimesformerModel`` and ``Blip2QFormerModel``; TCI,
STA, VCI and the class-wise head are written here in torch, after ``docs/model.md`` and
``cmdcl_jax.models``. :class:`TorchCMDCL` is the twin of one of our models, with the same
weights; it reads every choice (``tci``, ``vci``, temperatures, ``text_scale``, the
approximators' skip connections) from the model and its config, so the two stay like for
like.

Run as a script, it checks parity in float32 on a random batch, without dropout: the
same logits, loss and gradient norm, and as many parameters on both sides.

  PYTHONPATH=. python benchmarks/torch_twin.py --preset small
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import torch
import transformers
from flax import nnx
from torch import nn
from torch.nn import functional as F

from cmdcl_jax.models import clip as clip_lib
from cmdcl_jax.models import hf_weights, qformer, timesformer
from cmdcl_jax.models.cmdcl import CMDCL, TEXT_SCALES, Architectures

# The Q-Former's text branch (``intermediate``/``output``, not ``*_query``): our port has
# none, so the twin leaves it at transformers' initialisation; queries never run it.
_QFORMER_TEXT_BRANCH = re.compile(r"encoder\.layer\.\d+\.(intermediate|output)\.")


def _tensor(x) -> torch.Tensor:
    return torch.from_numpy(np.array(x, np.float32))


def _copy_linear(dst: nn.Linear, src) -> None:
    """NNX ``Linear`` (kernel [in, out]) -> torch ``nn.Linear`` (weight [out, in])."""
    dst.weight.data.copy_(_tensor(src.kernel[...]).T)
    dst.bias.data.copy_(_tensor(src.bias[...]))


def _copy_norm(dst: nn.LayerNorm, src) -> None:
    dst.weight.data.copy_(_tensor(src.scale[...]))
    dst.bias.data.copy_(_tensor(src.bias[...]))


def _load_hf(module: nn.Module, tensors: dict[str, np.ndarray], *, skip=None) -> None:
    """Loads exported tensors into a transformers module; every weight but ``skip``'s."""
    missing, unexpected = module.load_state_dict(
        {k: _tensor(v) for k, v in tensors.items()}, strict=False
    )
    missing = [k for k in missing if not (skip and skip.search(k))]
    if missing or unexpected:
        raise ValueError(f"{type(module).__name__}: missing {missing}, unexpected {unexpected}")


class _Holder(nnx.Module):
    """Puts a module where a rule table expects it (``vision.`` for CLIP's vision rules)."""

    def __init__(self, **modules):
        for name, module in modules.items():
            setattr(self, name, module)


class Approximator(nn.Module):
    """``h``/``g``: ``LayerNorm(skip + MLP([anchor; evidence]))``, skip as ``residual``."""

    def __init__(self, src):
        super().__init__()
        d = src.norm.scale.shape[0]
        self.residual = src.residual
        self.fc1, self.fc2 = nn.Linear(2 * d, d), nn.Linear(d, d)
        self.norm = nn.LayerNorm(d, eps=src.norm.epsilon)
        _copy_linear(self.fc1, src.mlp.fc1)
        _copy_linear(self.fc2, src.mlp.fc2)
        _copy_norm(self.norm, src.norm)

    def forward(self, anchor: torch.Tensor, evidence: torch.Tensor) -> torch.Tensor:
        """anchor, evidence [..., D] -> [..., D]."""
        out = self.fc2(F.gelu(self.fc1(torch.cat([anchor, evidence], dim=-1))))
        if self.residual == "anchor":
            out = out + anchor
        elif self.residual == "evidence":
            out = out + evidence
        return self.norm(out)


class PreNormBlock(nn.Module):
    """``x + attn(ln1(x))``, then ``x + mlp(ln2(x))`` (the STA block), SDPA attention."""

    def __init__(self, src):
        super().__init__()
        d = src.layer_norm1.scale.shape[0]
        hidden = src.mlp.fc1.kernel.shape[1]
        self.num_heads = src.self_attn.num_heads
        self.ln1 = nn.LayerNorm(d, eps=src.layer_norm1.epsilon)
        self.ln2 = nn.LayerNorm(d, eps=src.layer_norm2.epsilon)
        self.query, self.key, self.value, self.out = (nn.Linear(d, d) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(d, hidden), nn.Linear(hidden, d)
        for name in ("query", "key", "value", "out"):
            _copy_linear(getattr(self, name), getattr(src.self_attn, name))
        _copy_linear(self.fc1, src.mlp.fc1)
        _copy_linear(self.fc2, src.mlp.fc2)
        _copy_norm(self.ln1, src.layer_norm1)
        _copy_norm(self.ln2, src.layer_norm2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, L, D] -> [B, L, D]."""
        b, l, d = x.shape
        h = self.ln1(x)

        def heads(t):  # [B, L, D] -> [B, heads, L, D / heads]
            return t.view(b, l, self.num_heads, -1).transpose(1, 2)

        q, k, v = heads(self.query(h)), heads(self.key(h)), heads(self.value(h))
        attn = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, l, d)
        x = x + self.out(attn)
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class STA(nn.Module):
    """Temporal position table, the pre-LN blocks, a final LayerNorm: V [B, L, D] -> VH."""

    def __init__(self, src):
        super().__init__()
        self.position = nn.Parameter(_tensor(src.position[...]))  # [L, D]
        self.blocks = nn.ModuleList([PreNormBlock(b) for b in src.blocks])
        self.norm = nn.LayerNorm(self.position.shape[1], eps=src.norm.epsilon)
        _copy_norm(self.norm, src.norm)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        if frames.shape[1] != self.position.shape[0]:
            raise ValueError(
                f"the twin's STA runs at its table's {self.position.shape[0]} frames, "
                f"got {frames.shape[1]}"
            )
        x = frames + self.position
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


class TorchCMDCL(nn.Module):
    """The twin of a :class:`CMDCL`: uint8 video [B, L, H, W, 3] -> logits [B, C]."""

    def __init__(self, model: CMDCL, arch: Architectures):
        super().__init__()
        cfg = model.cfg
        self.tci, self.vci = cfg.tci, cfg.vci
        self.text_scale = TEXT_SCALES[cfg.text_scale]
        self.learn_temperature = cfg.learn_temperature
        self.tau = (cfg.tau_t, cfg.tau_v)
        if cfg.learn_temperature:
            self.log_tau = nn.Parameter(_tensor(model.log_tau[...]))
        self.register_buffer(
            "clip_mean", torch.tensor(model.clip.image_mean).view(1, 1, 1, 3), persistent=False
        )
        self.register_buffer(
            "clip_std", torch.tensor(model.clip.image_std).view(1, 1, 1, 3), persistent=False
        )
        ts_cfg = model.timesformer.cfg
        self.register_buffer(
            "video_mean", torch.tensor(ts_cfg.image_mean).view(1, 1, 1, 3), persistent=False
        )
        self.register_buffer(
            "video_std", torch.tensor(ts_cfg.image_std).view(1, 1, 1, 3), persistent=False
        )

        self.clip = _clip_vision(model, arch.clip)
        self.clip.requires_grad_(False)
        self.text_embeddings = nn.Parameter(_tensor(model.text_embeddings[...]))  # [C, D]
        self.timesformer = _timesformer(model, arch.timesformer)
        d = self.text_embeddings.shape[1]
        self.video_proj = nn.Linear(ts_cfg.hidden_size, d)
        _copy_linear(self.video_proj, model.video_proj)
        self.video_norm = None
        if model.video_norm is not None:
            self.video_norm = nn.LayerNorm(d, eps=model.video_norm.epsilon)
            _copy_norm(self.video_norm, model.video_norm)
        self.tci_h = Approximator(model.tci_h) if cfg.tci else None
        self.sta = STA(model.sta) if cfg.vci else None
        self.vci_g = Approximator(model.vci_g) if cfg.vci else None
        self.qformer = _qformer(model, arch.qformer)
        self.dropout = nn.Dropout(cfg.dropout)
        self.head_weight = nn.Parameter(_tensor(model.head_weight[...]))  # [C, D]
        self.head_bias = nn.Parameter(_tensor(model.head_bias[...]))  # [C]

    def temperatures(self):
        if self.learn_temperature:
            tau = torch.exp(self.log_tau)
            return tau[0], tau[1]
        return self.tau

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        """uint8 [B, L, H, W, 3] -> logits [B, C] (dropout when ``self.training``)."""
        b, l, h, w, _ = video.shape
        tau_t, tau_v = self.temperatures()
        frames = video.float() / 255.0  # [B, L, H, W, 3]
        with torch.no_grad():
            pixels = ((frames - self.clip_mean) / self.clip_std).reshape(b * l, h, w, 3)
            embeds = self.clip(pixel_values=pixels.permute(0, 3, 1, 2)).image_embeds
            v_p = F.normalize(embeds, dim=-1).reshape(b, l, -1)  # [B, L, D]
        text = self.text_embeddings  # [C, D]
        c, d = text.shape
        if self.tci:
            s = torch.softmax(torch.einsum("bld,cd->bcl", v_p, text) / tau_t, dim=-1)
            bias = torch.einsum("bcl,bld->bcd", s, v_p)  # [B, C, D]
            t_prime = self.tci_h(text.expand(b, c, d), bias)  # [B, C, D]
        else:
            t_prime = text.expand(b, c, d)
        t_prime = F.normalize(t_prime, dim=-1) * self.text_scale(d)

        pixels = ((frames - self.video_mean) / self.video_std).permute(0, 1, 4, 2, 3)
        hidden = self.timesformer(pixel_values=pixels).last_hidden_state  # [B, 1+N*L, Dv]
        tokens = hidden[:, 1:].reshape(b, -1, l, hidden.shape[-1])  # [B, N, L, Dv]
        v = self.video_proj(tokens.mean(dim=1))  # [B, L, D]
        if self.video_norm is not None:
            v = self.video_norm(v)
        if self.vci:
            vh = self.sta(v)  # [B, L, D]
            sf = torch.softmax(vh[:, None] * t_prime[:, :, None] / tau_v, dim=2)  # [B,C,L,D]
            vhat = (sf * vh[:, None]).sum(dim=2)  # [B, C, D]
            v_prime = self.vci_g(t_prime, vhat)  # [B, C, D]
        else:
            v_prime = v
        f = self.qformer(query_embeds=t_prime, encoder_hidden_states=v_prime).last_hidden_state
        f = self.dropout(f)  # [B, C, D]
        return torch.einsum("bcd,cd->bc", f, self.head_weight) + self.head_bias


def _clip_vision(model: CMDCL, cfg: clip_lib.ClipConfig) -> nn.Module:
    v = cfg.vision
    hf = transformers.CLIPVisionConfig(
        hidden_size=v.hidden_size,
        intermediate_size=v.intermediate_size,
        num_hidden_layers=v.num_hidden_layers,
        num_attention_heads=v.num_attention_heads,
        hidden_act=v.hidden_act,
        layer_norm_eps=v.layer_norm_eps,
        image_size=v.image_size,
        patch_size=v.patch_size,
        num_channels=v.num_channels,
        projection_dim=cfg.projection_dim,
    )
    out = transformers.CLIPVisionModelWithProjection(hf)
    vision_rules = [r for r in clip_lib.RULES if r[1].startswith("vision.")]
    _load_hf(out, hf_weights.export_params(_Holder(vision=model.clip), vision_rules))
    return out.eval()


def _timesformer(model: CMDCL, cfg: timesformer.TimesformerConfig) -> nn.Module:
    fields = dataclasses.asdict(cfg)
    fields.pop("image_mean"), fields.pop("image_std")
    out = transformers.TimesformerModel(transformers.TimesformerConfig(**fields))
    _load_hf(out, hf_weights.export_params(model.timesformer, timesformer.rules()))
    return out


def _qformer(model: CMDCL, cfg: qformer.QFormerConfig) -> nn.Module:
    hf = transformers.Blip2QFormerConfig(
        **dataclasses.asdict(cfg), hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
    )
    out = transformers.Blip2QFormerModel(hf)
    tensors = hf_weights.export_params(model.qformer, qformer.rules())
    _load_hf(out, tensors, skip=_QFORMER_TEXT_BRANCH)
    return out


def twin_parameters(twin: TorchCMDCL) -> dict[str, nn.Parameter]:
    """The twin's parameters that have a counterpart in our model (not the Q-Former's
    unused text branch)."""
    return {
        name: p
        for name, p in twin.named_parameters()
        if not (name.startswith("qformer.") and _QFORMER_TEXT_BRANCH.search(name))
    }


def main(argv) -> None:
    import jax
    import jax.numpy as jnp
    import optax
    from presets import preset

    from cmdcl_jax import cli
    from cmdcl_jax.models.cmdcl import TRAINABLE, count_params

    del argv
    cli.quiet_logs()
    p = preset(_PRESET.value)
    model = p.build(seed=0)
    twin = TorchCMDCL(model, p.arch).eval()
    batch = p.batch(seed=1)

    graphdef, params, frozen = nnx.split(model, TRAINABLE, ...)

    def loss_fn(params, frozen, video, label):
        logits, _ = nnx.merge(graphdef, params, frozen)(video)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, label).mean()
        return loss, logits

    (loss, logits), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
        params, frozen, jnp.asarray(batch["video"]), jnp.asarray(batch["label"])
    )
    ours = {"loss": float(loss), "grad_norm": float(optax.tree.norm(grads))}

    twin_logits = twin(torch.from_numpy(batch["video"]))
    twin_loss = F.cross_entropy(twin_logits, torch.from_numpy(batch["label"]).long())
    twin_loss.backward()
    trainable = [q for q in twin_parameters(twin).values() if q.requires_grad]
    grad_norm = torch.sqrt(sum((q.grad.double() ** 2).sum() for q in trainable))
    theirs = {"loss": float(twin_loss.detach()), "grad_norm": float(grad_norm)}

    counts = (count_params(model), sum(q.numel() for q in twin_parameters(twin).values()))
    diff = np.abs(twin_logits.detach().numpy() - np.asarray(logits))
    print(f"preset {p.name}: parameters ours {counts[0]:,}, twin {counts[1]:,}")
    print(f"logits max |ours - twin| {diff.max():.2e} (largest |logit| {np.abs(logits).max():.3f})")
    for key in ours:
        print(f"{key}: ours {ours[key]:.6f}, twin {theirs[key]:.6f}")
    # Float32 on both sides, sums taken in other orders through about 20 layers: logits of
    # size ~1 agree to ~1e-6; 1e-4 relative plus 1e-4 absolute, as the weight-port tests.
    np.testing.assert_allclose(twin_logits.detach().numpy(), logits, rtol=1e-4, atol=1e-4)
    for key in ours:
        np.testing.assert_allclose(theirs[key], ours[key], rtol=1e-4, atol=1e-5)
    if counts[0] != counts[1]:
        raise AssertionError(f"parameter counts differ: {counts}")
    print("parity: OK")


if __name__ == "__main__":
    from absl import app, flags

    _PRESET = flags.DEFINE_enum("preset", "small", ["tiny", "small", "base"], "Model preset.")
    app.run(main)
