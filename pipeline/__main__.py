"""``python -m apmpipe.pipeline`` runs the ``apmpipe`` command line."""

from .cli import main

main()
