"""`python -m reenact.cli ...`: the same as the `reenact` command."""
import sys

from . import main

sys.exit(main())
