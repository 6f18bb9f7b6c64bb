"""Shared glue for the absl entry points in experiments/: one-line errors and non-zero exits."""
from __future__ import annotations

import sys

from absl import app, logging

from tdmpc_jax.checkpoints.errors import CheckpointError

USER_ERRORS = (CheckpointError, ValueError, FileNotFoundError, PermissionError, NotADirectoryError, RuntimeError,
               FloatingPointError)


def run(main):
    """absl `app.run(main)`, but a user error prints `error: <one line>` and exits with status 1."""
    def wrapped(argv):
        logging.set_verbosity(logging.WARNING)  # orbax/jax INFO chatter would bury the progress lines
        try:
            return main(argv)
        except USER_ERRORS as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(1)
    app.run(wrapped)
