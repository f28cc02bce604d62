"""``python -m labelmatch.cli``."""

from labelmatch.cli import main

main()
