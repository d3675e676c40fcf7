"""Imported once by the forkserver of tests/cli_fork.py before it forks any `athanor` call: the libraries every
job imports, ~6 s of CPU that each call would otherwise pay again."""

import os

# The forkserver inherited the pytest worker's fd 1, which is the worker's channel to its controller under
# pytest-xdist: nothing the libraries print at import may land there. (Each child points fd 1 at its own file.)
_devnull = os.open(os.devnull, os.O_WRONLY)
os.dup2(_devnull, 1)
os.close(_devnull)

import lightning.pytorch  # noqa: E402,F401 — imports torch too
import mlflow  # noqa: E402,F401
import transformers  # noqa: E402,F401
