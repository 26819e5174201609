"""``reenact.train``: the public names of :mod:`reenact.training` (the trainer, checkpoints, the
``reenact train`` command), under the module name they always had."""
from .training import *  # noqa: F401,F403
from .training import __all__  # noqa: F401
