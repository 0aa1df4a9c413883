"""Fields every run config shares; each file in `configs/` overrides what it needs.

It lives in the package, so that a config file loads by path from any directory.
"""

import ml_collections

from cmdcl_jax.sharding import MIN_SHARDED_SIZE


def base_config() -> ml_collections.ConfigDict:
    """The paper's training settings (Sec. 4.1) on the paper-scale model."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.log_every = 50

    c.dataset = ml_collections.ConfigDict()
    c.dataset.name = ""  # breakfast | coin | charades | causal_kitchen
    c.dataset.task = ""
    c.dataset.num_classes = -1  # checked against the data when set
    c.dataset.data_dir = "data"  # where `python -m cmdcl_jax.prepare` wrote the shards
    c.dataset.config = ""  # builder config name, when a dataset was prepared several ways
    c.dataset.train_split = "train"
    c.dataset.eval_splits = ("test",)  # the first one picks the best checkpoint
    c.dataset.num_frames = 64  # L (Fig. 7b: best at 64)
    c.dataset.crop_size = 224
    c.dataset.crop_area = (0.25, 1.0)  # training crops: range of their share of the frame area
    c.dataset.num_workers = 4  # grain worker processes

    c.model = ml_collections.ConfigDict()
    c.model.preset = "base"  # CMDCLConfig.base() or .tiny(); the fields below override it
    # Tiny preset only: width of its CLIP, TimeSformer and Q-Former (default 32).
    c.model.width = ml_collections.FieldReference(None, field_type=int)
    c.model.clip = ml_collections.FieldReference(None, field_type=str)
    c.model.timesformer = ml_collections.FieldReference(None, field_type=str)
    c.model.tci = True
    c.model.vci = True
    # TCI's bias term: "sample" (each video's own attention-pooled frames) or "dictionary"
    # (the back-door sum over K confounder prototypes with their prior; docs/model.md).
    c.model.tci_mode = ml_collections.FieldReference(None, field_type=str)
    c.model.num_confounders = ml_collections.FieldReference(None, field_type=int)  # K
    c.model.confounder_momentum = ml_collections.FieldReference(None, field_type=float)
    c.model.num_frames = c.dataset.get_ref("num_frames")
    c.model.sta_layers = ml_collections.FieldReference(None, field_type=int)
    c.model.tau_t = ml_collections.FieldReference(None, field_type=float)
    c.model.tau_v = ml_collections.FieldReference(None, field_type=float)
    c.model.g_residual = ml_collections.FieldReference(None, field_type=str)
    c.model.text_scale = ml_collections.FieldReference(None, field_type=str)
    c.model.video_norm = ml_collections.FieldReference(None, field_type=bool)
    c.model.class_chunk = ml_collections.FieldReference(None, field_type=int)
    c.model.prompt_template = ml_collections.FieldReference(None, field_type=str)
    c.model.dropout = ml_collections.FieldReference(None, field_type=float)
    # Std of the random weight matrices (base: 0.02; tiny: 0.02 * sqrt(768 / width)).
    c.model.init_std = ml_collections.FieldReference(None, field_type=float)
    c.model.dtype = "bfloat16"
    c.model.remat = True
    # TimeSformer attention: auto (cuDNN on an NVIDIA GPU in bfloat16, else XLA's), xla,
    # cudnn, or explicit (written-out einsums).
    c.model.attention = "auto"

    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 8  # global; the paper does not give it
    # Micro-batches per step (gradient accumulation). 8: one clip per micro-batch on one
    # device, what a 24 GB card holds at 32-64 frames (README, "Memory plan"); on N
    # devices use 8 / N.
    c.train.accum_steps = 8
    c.train.num_epochs = 80
    c.train.num_steps = -1  # > 0 overrides num_epochs
    c.train.learning_rate = 1e-5  # peak, cosine decay to 0
    c.train.warmup_steps = 0
    c.train.grad_clip = 1.0  # global norm; <= 0 disables
    c.train.adam_b1 = 0.9
    c.train.adam_b2 = 0.999
    # Train on one fixed view of each clip (the evaluation view: segment middles, centre
    # crop, no flip) and compute the frozen CLIP's frame features V_P of the training split
    # once, before the first step, instead of in every step (TCI's input; N x L x D floats
    # in each process's memory). Exact for that view; it costs all training augmentation.
    c.train.clip_cache = False

    c.eval = ml_collections.ConfigDict()
    c.eval.batch_size = 8
    c.eval.every_steps = -1  # <= 0: only at the end
    c.eval.num_clips = 1
    c.eval.num_crops = 1

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 1000
    c.checkpoint.keep = 2  # the last `keep`, plus the best on eval_splits[0]
    c.checkpoint.async_save = True

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # -1 fills the devices left
    c.mesh.fsdp = 1  # > 1 shards parameters and optimizer state
    # With fsdp > 1: arrays of fewer elements stay replicated (norms, biases; 2**14 float32
    # is 64 KiB), larger ones are split over fsdp along an axis that divides by it.
    c.mesh.fsdp_min_size = MIN_SHARDED_SIZE
    c.mesh.shard_frozen = True  # the frozen CLIP sharded like the parameters, or replicated
    return c
