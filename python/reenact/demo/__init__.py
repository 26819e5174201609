"""``reenact demo``: a real face with no training, then a short synthetic training run.

- ``stages``: the demo's stages and :func:`run_demo` (its docstring lists them);
- ``real_face``: stage 0, the astronaut portrait in the training-free geometric mode;
- ``commands``: the ``reenact demo`` subcommand.
"""
from .stages import (
    DISPLAY_SCALE,
    GRID_ROWS,
    MARKER,
    THREADS,
    DemoError,
    DemoRecipe,
    claim_output,
    diverse_frames,
    make_data,
    reenact_heldout,
    run_demo,
    train_model,
    write_grid,
    write_loss_plot,
)

__all__ = [
    "DISPLAY_SCALE", "GRID_ROWS", "MARKER", "THREADS", "DemoError", "DemoRecipe", "claim_output", "diverse_frames",
    "make_data", "reenact_heldout", "run_demo", "train_model", "write_grid", "write_loss_plot",
]
