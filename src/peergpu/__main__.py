"""Allows `python -m peergpu`."""

from peergpu.cli import main

main()
