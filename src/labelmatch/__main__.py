"""``python -m labelmatch``."""

from labelmatch.cli import main

main()
