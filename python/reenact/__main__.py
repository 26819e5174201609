"""`python -m reenact ...`: the same as the `reenact` command."""
import sys

from .cli import main

sys.exit(main())
