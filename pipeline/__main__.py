"""``python -m pipeline`` runs the ``apmpipe`` command line."""
from .cli import main

main()
