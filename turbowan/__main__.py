"""``python -m turbowan``: the same command line as the installed ``turbowan`` entry point."""

from .cli import run_command

run_command()
