"""``python -m sandbox`` runs the ``model-sandbox`` command."""

from ._cli import run

run()
