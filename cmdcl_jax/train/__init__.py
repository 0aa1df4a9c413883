"""Training and evaluation of CMDCL, behind ``cmdcl_jax.main``.

One module per concern: ``setup`` (task, data, model config, optimizer, loaders),
``validation`` (config and data checked before step 1), ``lock`` (one run per workdir),
``run_record`` (``run.json``), ``checkpoints`` (Orbax saves, retention, checked restore),
``steps`` (the compiled train and eval steps), ``evaluation``, ``metrics_log``
(``metrics.jsonl`` and TensorBoard) and ``loop`` (the entry points below).

The entry points are imported on first use, so ``cmdcl_jax.train.steps`` loads without
the data stack (grain, TFDS): a benchmark of the step needs only JAX and the model.
"""

__all__ = ["evaluate_checkpoint", "train_and_evaluate"]


def __getattr__(name: str):
    if name in __all__:
        from cmdcl_jax.train import loop

        return getattr(loop, name)
    raise AttributeError(f"module 'cmdcl_jax.train' has no attribute {name!r}")
