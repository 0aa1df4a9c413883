"""What the command-line entry points share."""

from absl import flags, logging


def quiet_logs() -> None:
    """absl WARNING unless --verbosity was given: Orbax's INFO lines would drown the output."""
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
