"""Sharded ``prepare`` runs: which inputs a shard takes, and joining shard outputs into one dataset.

``reenact prepare --shard K/N`` keeps the input videos whose path hash is K modulo N: the split
depends on nothing but the relative path, so N machines (a SLURM array, a Kubernetes indexed job)
agree on it without talking to each other, and adding files never moves a file to another shard.
Each shard writes its own OUT_DIR. ``reenact merge-datasets OUT SHARD...`` then links (or, across
file systems, copies) every shard's clips into OUT, writes one manifest and one report, and
refuses duplicates: a source video prepared by two shards, or two clips with one name.
"""
import hashlib
import json
import os
import pathlib
import re
import shutil

from . import format as fmt


def parse_shard(text):
    """'K/N' -> (K, N) with 0 <= K < N; ValueError naming the problem otherwise."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not match:
        raise ValueError(f"--shard must look like K/N (e.g. 3/16), got {text!r}")
    index, count = int(match.group(1)), int(match.group(2))
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"--shard K/N needs 0 <= K < N, got {index}/{count}")
    return index, count


def shard_of(relative, count):
    """The shard (0..count-1) of an input video's path relative to RAW_VIDEO_DIR. The hash is of the
    name's bytes as the file system has them (os.fsencode), so a name that is not UTF-8 gets a shard
    too and is skipped later with a reason, like any unreadable file."""
    posix = pathlib.PurePath(relative).as_posix()
    return int.from_bytes(hashlib.sha1(os.fsencode(posix)).digest()[:8], "big") % count


def merge_datasets(out_dir, shard_dirs, copy=False):
    """Join prepared shard datasets into ``out_dir`` -> the merged ``ClipRecord`` list.

    Clip and parameter files are hard-linked (copied with ``copy=True`` or when linking fails);
    the shards are left as they are. Raises DatasetError, before writing anything, on duplicate
    sources or clip names, on datasets of different crop sizes or face models, or when
    ``out_dir`` already holds a manifest.
    """
    out_dir = pathlib.Path(os.fspath(out_dir))
    shard_dirs = [pathlib.Path(os.fspath(d)) for d in shard_dirs]
    if not shard_dirs:
        raise fmt.DatasetError("merge-datasets needs at least one shard directory")
    if (out_dir / fmt.MANIFEST_NAME).exists():
        raise fmt.DatasetError(f"{out_dir} already holds a {fmt.MANIFEST_NAME}; merge into a new directory")
    records, owner, reports = [], {}, []
    by_source, problems = {}, []
    for shard in shard_dirs:
        if shard.resolve() == out_dir.resolve():
            raise fmt.DatasetError(f"the output {out_dir} is also a shard")
        for record in fmt.read_manifest(shard):
            for key, seen in ((record.clip, owner), (record.source, by_source)):
                if key in seen and seen[key] != shard:
                    problems.append(f"{key} in both {seen[key]} and {shard}")
                elif key in seen:
                    problems.append(f"{key} twice in {shard}")
                seen[key] = shard
            records.append((shard, record))
        report = shard / "prepare_report.json"
        if report.is_file():
            reports.append(json.loads(report.read_text(encoding="utf-8")))
    if problems:
        raise fmt.DatasetError(f"duplicates, nothing merged: {'; '.join(problems[:10])}"
                               + (f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""))
    for what, values in (("crop sizes", {r.size for _, r in records}),
                         ("face models", {r.get("model") for r in reports if r.get("model")})):
        if len(values) > 1:
            raise fmt.DatasetError(f"the shards differ in {what}: {sorted(values)}; nothing merged")
    out_dir.mkdir(parents=True, exist_ok=True)
    for shard, record in records:
        for relative in (record.clip, record.params):
            _place(_inside(shard, relative), out_dir / relative, copy)
    merged = [record for _, record in records]
    fmt.write_manifest(out_dir, merged)
    summary = {"merged_from": [str(d) for d in shard_dirs], "clips": len(merged),
               "files": sum(r.get("files", 0) for r in reports), "frames_in": sum(r.get("frames_in", 0) for r in reports),
               "skipped": [s for r in reports for s in r.get("skipped", [])],
               "model": next((r["model"] for r in reports if r.get("model")), ""),
               "valid_fraction": {k: v for r in reports for k, v in r.get("valid_fraction", {}).items()}}
    (out_dir / "prepare_report.json").write_text(json.dumps(summary, ensure_ascii=False, indent=1), encoding="utf-8")
    return merged


def _inside(root, relative):
    path = (root / relative).resolve()
    if root.resolve() not in path.parents or not path.is_file():
        raise fmt.DatasetError(f"{root}: manifest path {relative!r} is missing or leaves the dataset")
    return path


def _place(source, target, copy):
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        raise fmt.DatasetError(f"{target} exists already; merge into a new directory")
    if not copy:
        try:
            os.link(source, target)
            return
        except OSError:
            pass  # another file system, or links not allowed: copy instead
    shutil.copy2(source, target)


__all__ = ["parse_shard", "shard_of", "merge_datasets"]
