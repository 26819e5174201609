"""``eval.md`` and ``eval.json``: the report of one evaluation."""
import json
import pathlib

from .. import output_folders
from .metrics import PSNR_CAP_DB
from .options import EvalError
from .refit import DETECT_SIZE

#: The methods every evaluation scores on the same pairs: the model and its two trivial baselines.
MODEL = "model"
GEOMETRIC = "geometric warp"
COPY_SOURCE = "copy source"
METHODS = (MODEL, GEOMETRIC, COPY_SOURCE)


def _number(value, digits):
    return f"{value:.{digits}f}"


def repeat_warning(results):
    """The warning for pairs whose driving frame repeats the source frame bit for bit, or ""."""
    repeats = results.get("pairs_repeating_the_source", 0)
    if not repeats:
        return ""
    return (f"{repeats} of {results['pairs']} pairs drive with a frame bit-identical to the source frame (a "
            f"repeated frame in the clip: datasets prepared at 64 px before 2026-12-07 have them); "
            f"\"{COPY_SOURCE}\" scores the {PSNR_CAP_DB:.0f} dB cap there, so its PSNR mean is inflated: "
            f"prepare the data again")


def markdown_table(results):
    """The eval.md text of a results dict: one column per method, all on the same pairs."""
    methods = {MODEL: results["metrics"], **results.get("baselines", {})}
    names = [name for name in METHODS if name in methods]
    header = " | ".join(names)

    def row(label, cell, notes=""):
        return f"| {label} | " + " | ".join(cell(methods[name]) for name in names) + f" | {notes} |"

    warning = repeat_warning(results)
    lines = [f"# reenact eval: {results['checkpoint']} (step {results['step']})", "",
             f"- data: `{results['data']}`{' [synthetic]' if results['synthetic'] else ''}; "
             f"{results['clips']} clips, {results['pairs']} pairs; {results['protocol']}",
             f"- compared at {results['resolution']}x{results['resolution']} over the whole face crop "
             f"(dataset crops: {results['dataset_size']} px); face model: {results['face_model']}",
             f"- every method on the same pairs, against the driving frame: the model; \"{GEOMETRIC}\", the "
             f"training-free warp of the source along the identity-matched mesh (reenact.warp); \"{COPY_SOURCE}\", "
             f"the source frame unchanged",
             *([f"- **warning: {warning}**"] if warning else []), "",
             f"| metric | {header} | notes |", "|---|" + "---|" * len(names) + "---|",
             row("L1 (lower is better)", lambda m: _number(m["l1"]["mean"], 4), "mean abs. difference, images in [0, 1]"),
             row("PSNR dB (higher is better)", lambda m: _number(m["psnr"]["mean"], 2),
                 f"per image, capped at {PSNR_CAP_DB:.0f} dB"),
             row("SSIM (higher is better)", lambda m: _number(m["ssim"]["mean"], 4), "Gaussian window 11, sigma 1.5")]
    pose = results["metrics"]["pose"]
    if "status" in pose:
        lines.append(f"| pose / expression error | " + " | ".join([pose["status"]] + ["-"] * (len(names) - 1)) + " | |")
    else:
        lines.append(row("landmark detection rate on the output", lambda m: f"{m['pose']['detection_rate_output']:.0%}",
                         f"{pose['detector']}, on images upsampled to {DETECT_SIZE} px; driving frames: "
                         f"{pose['detection_rate_driving_frame']:.0%}"))
        labels = (("rotation_deg", "rotation error (deg)", 2), ("expression_abs", "expression error (mean abs. coeff.)", 4),
                  ("landmarks_iod", "landmark error / inter-ocular distance", 4))
        for key, label, digits in labels:
            def cell(m, key=key, digits=digits):
                return _number(m["pose"]["output_vs_params"][key], digits) if "output_vs_params" in m["pose"] \
                    else "n/a (no detections)"
            floor = pose.get("driving_frame_vs_params")
            lines.append(row(f"{label}: output re-fit vs driving params", cell,
                             "floor (driving frame's own re-fit vs params): "
                             + (_number(floor[key], digits) if floor else "n/a (no detections)")))
    ident = results["metrics"]["id_similarity"]
    if "status" in ident:
        lines.append(f"| identity cosine similarity to the source | " + " | ".join([ident["status"]] + ["-"] * (len(names) - 1)) + " | |")
    else:
        lines.append(row("identity cosine similarity to the source", lambda m: _number(m["id_similarity"]["mean"], 4),
                         f"driving frame vs source: {_number(ident['driving_frame'], 4)}"))
    fid = results["metrics"]["fid"]
    if "status" in fid:
        lines.append("| FID (output vs driving frames) | " + " | ".join([fid["status"]] + ["-"] * (len(names) - 1)) + " | |")
    else:
        lines.append(row("FID (output vs driving frames)", lambda m: _number(m["fid"]["value"], 3) if "value" in m["fid"]
                         else m["fid"]["status"], f"{fid['samples']} samples; torchvision Inception-v3 layout"))
    if results["skipped_clips"]:
        lines += ["", "Skipped clips:"] + [f"- {s['clip']}: {s['reason']}" for s in results["skipped_clips"]]
    return "\n".join(lines) + "\n"


def write_report(results, out_dir, inputs=()):
    """Write eval.json and eval.md under ``out_dir`` (created); never over one of ``inputs``."""
    out_dir = pathlib.Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise EvalError(f"--out must be a directory: {out_dir}")
    try:
        output_folders.claim(out_dir, "eval", "a rerun replaces eval.json and eval.md here", overwrite=True)
        output_folders.unless_input(out_dir, "eval.json", list(inputs)).write_text(json.dumps(results, indent=2, allow_nan=False) + "\n")
        output_folders.unless_input(out_dir, "eval.md", list(inputs)).write_text(markdown_table(results))
    except output_folders.OutputFolderError as err:
        raise EvalError(str(err)) from None
    except OSError as err:
        raise EvalError(f"--out {out_dir}: cannot write the report ({err.strerror or err})") from None
