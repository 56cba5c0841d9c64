"""`python -m gpt2cube ...` runs the CLI."""

from .cli import main

main()
