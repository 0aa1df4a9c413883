"""Training and evaluation of CMDCL, behind ``cmdcl_jax.main``.

One module per concern: ``setup`` (task, data, model config, optimizer, loaders),
``validation`` (config and data checked before step 1), ``lock`` (one run per workdir),
``run_record`` (``run.json``), ``checkpoints`` (Orbax saves, retention, checked restore),
``steps`` (the compiled train and eval steps), ``evaluation``, ``metrics_log``
(``metrics.jsonl`` and TensorBoard) and ``loop`` (the entry points below).
"""

from cmdcl_jax.train.loop import evaluate_checkpoint, train_and_evaluate

__all__ = ["evaluate_checkpoint", "train_and_evaluate"]
