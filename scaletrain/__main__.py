"""`python -m scaletrain ...` (and `torchrun ... -m scaletrain ...`)."""

from scaletrain.cli import main

main()
