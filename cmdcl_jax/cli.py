"""What the command-line entry points share: a console that shows the run, not the libraries."""

import importlib.util
import logging as std_logging
import os
import pkgutil

from absl import flags, logging

# Device nodes of an NVIDIA driver, where JAX looks for them: native, containers, WSL2.
_NVIDIA_DEVICES = ("/dev/nvidia0", "/dev/nvidiactl", "/dev/dxg")


def quiet_logs() -> None:
    """Keeps library chatter off the console unless ``--verbosity`` asks for it.

    Without ``--verbosity``: absl at WARNING (Orbax's INFO lines would drown the output),
    TFDS's own warnings dropped (such as "Using custom data configuration" or "Variant
    folder ... has no dataset_info.json" on a first preparation), transformers at ERROR
    (its "PyTorch was not found" concerns PyTorch models, which this project does not use);
    TFDS's announcements and progress bars follow the absl level
    (``cmdcl_jax.data.builders``). In any case, on a machine with JAX's CUDA plugin
    and no NVIDIA GPU, JAX is set to the CPU before it starts, so that the plugin's failed
    probe (``cuInit``) logs no traceback. Call it first thing in ``main``.
    """
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
        logging.get_absl_handler().addFilter(_not_a_tfds_warning)
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # read at its import
    _use_cpu_without_nvidia_gpu()


def _not_a_tfds_warning(record: std_logging.LogRecord) -> bool:
    return record.levelno >= std_logging.ERROR or "tensorflow_datasets" not in record.pathname


def _use_cpu_without_nvidia_gpu() -> None:
    """``jax_platforms=cpu`` where the CUDA plugin could find no GPU and nothing else could
    be used; an explicit ``JAX_PLATFORMS``, a TPU or another plugin leaves JAX to choose."""
    import jax  # here: `prepare` never starts JAX

    if jax.config.jax_platforms or any(os.path.exists(d) for d in _NVIDIA_DEVICES):
        return
    spec = importlib.util.find_spec("jax_plugins")
    locations = spec.submodule_search_locations if spec else []
    plugins = {module.name for module in pkgutil.iter_modules(locations)}
    only_cuda = plugins and all(name.startswith("xla_cuda") for name in plugins)
    if only_cuda and importlib.util.find_spec("libtpu") is None:
        jax.config.update("jax_platforms", "cpu")
        logging.info("no NVIDIA GPU visible: running on the CPU")
