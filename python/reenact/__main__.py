"""`python -m reenact ...`: the same as the `reenact` command."""
import sys

from reenact.cli import main

sys.exit(main())
