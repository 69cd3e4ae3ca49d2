"""`python -m hawqtool` (also what torchrun launches)."""
from .cli import main

main()
