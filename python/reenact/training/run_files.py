"""Files of a run directory besides the checkpoints: ``log.jsonl``, sample grids, TensorBoard events."""
import json
import os
import pathlib

import numpy as np
import torch

from ..model import preview_panels
from .checkpoints import _atomic_write


def truncate_log(path, step):
    """Drop log lines of steps after ``step`` (written by a run that died after its last checkpoint)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(entry, dict) and entry.get("step", 0) <= step:
            kept.append(line)
    _atomic_write(path, ("\n".join(kept) + "\n" if kept else "").encode())


def save_sample_grid(path, source, driving, driving_pncc, outputs, max_rows=8):
    """A PNG of :func:`preview_panels` rows (source | driving | P_d' | warped | output)."""
    from PIL import Image  # optional dependency (pillow): checked when the run starts

    panels = preview_panels(source[:max_rows], driving[:max_rows], driving_pncc[:max_rows],
                            {key: outputs[key][:max_rows] for key in ("flow", "output")})
    grid = torch.cat(list(panels), dim=1)  # rows stacked: (3, B H, 5 W)
    array = (grid.permute(1, 2, 0).cpu().numpy() * 255.0 + 0.5).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer_path = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    Image.fromarray(array).save(buffer_path, format="PNG")
    os.replace(buffer_path, path)


def tensorboard_writer(run_dir):
    try:
        from torch.utils.tensorboard import SummaryWriter  # optional dependency: without it, no events
    except ImportError:
        return None
    return SummaryWriter(str(pathlib.Path(run_dir) / "tensorboard"))
