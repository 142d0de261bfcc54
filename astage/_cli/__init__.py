"""The ``astage`` command (``python -m astage``): looking inside checkpoints without Python.

:mod:`._report` builds what the command says about a file or a :class:`~astage.CheckpointDir`
folder as one JSON-ready document (the ``--json`` output), :mod:`._text` renders that document
for a terminal, and :mod:`._main` parses the arguments and chooses the exit code.
"""

from ._main import main

__all__ = ["main"]
