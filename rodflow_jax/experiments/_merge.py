r"""Sweeps split across machines: shards of one configuration grid, and merging them back.

A job array (SLURM ``--array``, submitit's ``map_array``, any scheduler) runs the same sweep N
times with ``shard=(i, N)``: each run evaluates the i-th of N contiguous, near-equal slices of
the configuration list (:func:`~._sweep.configurations`, split as ``np.array_split`` splits),
with the start step K and the probe grid resolved over the *whole* grid, so every row is the
row the one-machine sweep would write. ``sweep_info.json`` records the slice
(``"shard": {"index", "count", "configurations": [first, stop)}``) and a ``fingerprint`` of
everything the shards must share. :func:`merge_shards` checks the shards form one complete,
non-overlapping cover of one grid and writes the sweep folder the single run would have
written (the same ``sweep.json`` and arrays; timings summed over the shards).
"""

from __future__ import annotations

import hashlib
import json
import math
import zipfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .._errors import InputError

SHARED_ARRAYS = ("probe_steps",)  # the same in every shard; every other array has a row per configuration
# the sweep_info.json entries the fingerprint covers, named in a mismatch message
FINGERPRINTED = ("problem", "optimizer", "grid", "seeds", "num_steps", "start_step", "start_after_transient", "models",
                 "fixed",
                 "probe_every", "float64", "batch_size")


def parse_shard(text: str, flag: str = "--shard") -> tuple[int, int]:
    """``"I/N"`` -> ``(I, N)``, checked by :func:`check_shard`."""
    try:
        i, n = (int(v) for v in str(text).strip().split("/"))
    except ValueError:
        raise InputError(f"{flag} must be I/N (shard I of N, 0 <= I < N), got {text!r}") from None
    return check_shard((i, n), flag)


def check_shard(shard, flag: str = "shard") -> tuple[int, int]:
    try:
        i, n = shard
        if isinstance(i, bool) or isinstance(n, bool) or int(i) != i or int(n) != n:
            raise ValueError
        i, n = int(i), int(n)
    except (TypeError, ValueError):
        raise InputError(f"{flag} must be a pair (I, N) of integers, got {shard!r}") from None
    if n < 1:
        raise InputError(f"{flag} {i}/{n}: the number of shards N must be at least 1")
    if not 0 <= i < n:
        raise InputError(f"{flag} {i}/{n}: the shard index must lie in 0..{n - 1} (0-based)")
    return i, n


def shard_range(num_configurations: int, shard) -> tuple[int, int]:
    """``[first, stop)`` of shard ``(i, n)`` of ``num_configurations`` (``np.array_split``'s
    slices: the first ``B % n`` shards have one configuration more). More shards than
    configurations would leave shards empty, and is refused for every shard alike."""
    i, n = check_shard(shard)
    if n > num_configurations:
        raise InputError(f"shard {i}/{n}: {n} shards for {num_configurations} configuration(s) would leave "
                         f"shards empty; use at most {num_configurations}")
    size, extra = divmod(num_configurations, n)
    first = i * size + min(i, extra)
    return first, first + size + (i < extra)


def _canonical(x):
    if isinstance(x, dict):
        return {str(k): _canonical(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_canonical(v) for v in x]
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return repr(float(x))  # exact, and the same for 1 and 1.0 only if they are the same float
    return x


# written by the CLI only, after the fingerprint (which hashes the dtype instead): a shard made from
# Python has no such entry and still merges with a CLI shard of the same sweep
UNHASHED = ("float64",)


def fingerprint(fields: dict[str, Any]) -> str:
    """A short hash of the fields every shard of one sweep must share."""
    text = json.dumps(_canonical(fields), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# --- merging ------------------------------------------------------------------------------------
def _read_shard(d) -> dict:
    path = Path(d)
    if not path.is_dir():
        raise InputError(f"{d} is not a folder")
    missing = [f for f in ("sweep_info.json", "sweep.json", "sweep_arrays.npz") if not (path / f).is_file()]
    if missing:
        raise InputError(f"{d} is not a sweep folder (no {', '.join(missing)})")
    try:
        info = json.loads((path / "sweep_info.json").read_text())
        records = json.loads((path / "sweep.json").read_text())
        with np.load(path / "sweep_arrays.npz") as z:
            arrays = {k: z[k] for k in z.files}
        timings = json.loads((path / "timings.json").read_text()) if (path / "timings.json").is_file() else {}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:  # a truncated .npz is a BadZipFile
        raise InputError(f"{d}: cannot read the sweep ({type(e).__name__}: {e})") from None
    shard = info.get("shard") if isinstance(info, dict) else None
    if not isinstance(shard, dict) or "fingerprint" not in info:
        raise InputError(f"{d} is not a sweep shard (its sweep_info.json has no shard entry: "
                         "run the sweep with --shard I/N)")
    try:
        index, count = int(shard["index"]), int(shard["count"])
        first, stop = (int(v) for v in shard["configurations"])
    except (KeyError, TypeError, ValueError):
        raise InputError(f"{d}: its sweep_info.json has a malformed shard entry {shard!r}") from None
    if not isinstance(records, list) or len(records) != stop - first:
        raise InputError(f"{d}: sweep.json has {len(records) if isinstance(records, list) else 'no'} rows, "
                         f"its shard entry says configurations [{first}, {stop})")
    return dict(dir=str(d), path=path.resolve(), info=info, records=records, arrays=arrays, timings=timings,
                index=index, count=count, first=first, stop=stop)


def _differences(a: dict, b: dict) -> list[str]:
    return [k for k in FINGERPRINTED if a.get(k) != b.get(k)]


def _check_cover(shards: list[dict]) -> None:
    first = shards[0]
    for s in shards[1:]:
        # the fields too, not only the hash: a hand-edited grid keeps its old fingerprint
        keys = _differences(first["info"], s["info"])
        if [k for k in keys if k not in UNHASHED] or s["info"]["fingerprint"] != first["info"]["fingerprint"]:
            raise InputError(f"{first['dir']} and {s['dir']} are shards of different sweeps (they differ in "
                             f"{', '.join(keys) or 'settings outside sweep_info.json (top_k, flow options, ...)'})")
    counts = {s["count"] for s in shards}
    if len(counts) > 1:
        raise InputError("the shards were cut into different numbers of shards "
                         f"({', '.join(map(str, sorted(counts)))})")
    n = first["count"]
    seen: dict[int, str] = {}
    for s in shards:
        if s["index"] in seen:
            raise InputError(f"shard {s['index']}/{n} is given twice: {seen[s['index']]} and {s['dir']}")
        seen[s["index"]] = s["dir"]
    missing = sorted(set(range(n)) - set(seen))
    if missing:
        raise InputError(f"missing shard(s) {', '.join(map(str, missing))} of {n} (got {len(seen)})")
    total = math.prod(len(v) for v in first["info"]["grid"].values()) * len(first["info"]["seeds"])
    stop = 0
    for s in sorted(shards, key=lambda s: s["index"]):
        if (s["first"], s["stop"]) != shard_range(total, (s["index"], n)) or s["first"] != stop:
            raise InputError(f"{s['dir']} covers configurations [{s['first']}, {s['stop']}), not shard "
                             f"{s['index']}/{n} of {total} (overlapping or incomplete shards)")
        stop = s["stop"]


def _kind(v) -> str:
    """A JSON value's kind for the row check (ints and floats are one kind)."""
    return "number" if isinstance(v, (int, float)) and not isinstance(v, bool) else type(v).__name__


def _row_kinds(rec, prefix: str = "") -> dict[str, str]:
    """The kind of every entry of a row, nested entries as ``model.key``; null entries have none
    (a metric may be missing in one row, a message present in another)."""
    out = {}
    for k, v in rec.items():
        if v is None:
            continue
        out[prefix + k] = _kind(v)
        if isinstance(v, dict):
            out.update(_row_kinds(v, f"{prefix}{k}."))
    return out


def _check_rows(shards: list[dict]) -> None:
    """Each row is the configuration its position says (the shard was not edited or mixed up),
    and holds the same entries, of the same kinds, as every other row (a hand-edited value such as
    a string where a loss was would otherwise break the figures after the merge began)."""
    from ._sweep import configurations

    info = shards[0]["info"]
    configs = configurations(info["grid"], info["seeds"])
    seen: dict[str, tuple[str, str]] = {}  # entry -> (its kind, where it was first seen)
    for s in shards:
        for j, rec in enumerate(s["records"]):
            hp, seed = configs[s["first"] + j]
            if not isinstance(rec, dict) or rec.get("hyperparameters") != hp or rec.get("seed") != seed:
                raise InputError(f"{s['dir']}: row {j} of sweep.json is not configuration {s['first'] + j} "
                                 f"({hp}, seed {seed})")
            for m in info.get("models", []):
                if not isinstance(rec.get(m), dict):
                    raise InputError(f"{s['dir']}: row {j} of sweep.json has no {m} record (was the file edited?)")
            for key, kind in _row_kinds(rec).items():
                first = seen.setdefault(key, (kind, f"{s['dir']} row {j}"))
                if first[0] != kind:
                    raise InputError(f"{s['dir']}: row {j} of sweep.json has a {kind} as {key}, where {first[1]} has "
                                     f"a {first[0]} (was the file edited?)")


def _merge_arrays(shards: list[dict]) -> dict[str, np.ndarray]:
    keys = set(shards[0]["arrays"])
    for s in shards[1:]:
        if set(s["arrays"]) != keys:
            raise InputError(f"{shards[0]['dir']} and {s['dir']} hold different arrays "
                             f"({', '.join(sorted(keys ^ set(s['arrays'])))})")
    out = {}
    for k in shards[0]["arrays"]:
        parts = [s["arrays"][k] for s in shards]
        if k in SHARED_ARRAYS:
            for s, p in zip(shards[1:], parts[1:]):
                if p.shape != parts[0].shape or not np.array_equal(p, parts[0]):
                    raise InputError(f"{shards[0]['dir']} and {s['dir']} have different {k}")
            out[k] = parts[0]
            continue
        for s, p in zip(shards, parts):
            if p.ndim == 0 or p.shape[0] != s["stop"] - s["first"]:
                raise InputError(f"{s['dir']}: array {k} has shape {p.shape}, not one row per configuration")
        if len({p.shape[1:] for p in parts}) > 1:
            raise InputError(f"array {k} has different shapes in different shards")
        out[k] = np.concatenate(parts, axis=0)
    return out


def _merge_timings(shards: list[dict]) -> dict[str, float]:
    total: dict[str, float] = {}
    for s in shards:
        for k, v in s["timings"].items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                total[k] = total.get(k, 0.0) + float(v)
    return total


def merge_shards(dirs: Sequence, out, *, overwrite: bool = False) -> Path:
    """Join the sweep folders of all N shards of one sweep into the folder ``out``.

    ``sweep.json`` rows and the per-configuration arrays are concatenated in shard order (the
    order of the one-machine sweep), shared arrays (``probe_steps``) must agree,
    ``sweep_info.json`` loses its ``shard`` entry and counts every configuration (and lists the
    devices of each shard), ``timings.json`` sums the shards' times (compute spent, not wall
    time), and the figures are drawn again. Shards of different grids, a missing or repeated
    shard, a folder that is not a shard, or slices that do not tile the grid are refused with
    one :class:`InputError` before anything is written; ``out`` follows the output policy
    (:mod:`._output`).
    """
    from ._output import check_output
    from ._sweep import SweepResult

    path = check_output(out, overwrite=overwrite)
    if not dirs:
        raise InputError("merge needs the shard folders to join")
    shards = [_read_shard(d) for d in dirs]
    for s in shards:
        if s["path"] == path:
            raise InputError(f"--out {out} is one of the shards being merged: name a new folder")
    _check_cover(shards)
    shards.sort(key=lambda s: s["index"])
    _check_rows(shards)
    arrays = _merge_arrays(shards)
    records = [r for s in shards for r in s["records"]]
    info = {k: v for k, v in shards[0]["info"].items() if k != "shard"}
    info["num_configurations"] = len(records)
    devices = [s["info"].get("devices", 1) for s in shards]
    info["devices"] = devices[0] if len(set(map(str, devices))) == 1 else devices  # per shard where they differ
    info["merged_shards"] = len(shards)
    return SweepResult(records, arrays, info, _merge_timings(shards)).save(path, overwrite=overwrite)
