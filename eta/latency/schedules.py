"""A MetaSchedule schedule database as eta keeps it: one directory per target, with provenance.

The directory holds MetaSchedule's own ``JSONDatabase`` files (``database_workload.json``,
``database_tuning_record.json``) plus ``eta_schedules.json``: the TVM version and target the
records were tuned for, the trials spent on each task, and the tuning runs that spent them. A
record tuned for another target or TVM version says nothing true about this one, so such a
directory is refused, never mixed with new records.

``schedule_digest`` names the schedules a module would be compiled with: the best record of each
of its workloads, which is what ``MetaScheduleApplyDatabase`` applies. Tuning that adds records for
other workloads, or worse records for these, leaves the digest (and so the compiled-module cache
entry) unchanged; a better record changes it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from pathlib import Path

from ..errors import EtaError

log = logging.getLogger(__name__)

WORKLOADS = "database_workload.json"
RECORDS = "database_tuning_record.json"
STATE = "eta_schedules.json"
FORMAT = "eta-schedules/1"
# a failed candidate is recorded with this run time (MetaSchedule's MAX_FAIL_COST)
FAILED_S = 1e9

# target keys compared with what a record says it was tuned for
TARGET_KEYS = ("kind", "mcpu", "mtriple", "mattr", "arch", "num-cores")


def tvm_version() -> str:
    import importlib.metadata as md

    try:
        return md.version("apache-tvm")
    except md.PackageNotFoundError:
        import tvm

        return str(tvm.__version__)


def canonical_target(target: dict) -> dict:
    """The target as compared and hashed: keys sorted, ``num-cores`` an int."""
    out = {k: target[k] for k in sorted(target)}
    if "num-cores" in out:
        out["num-cores"] = int(out["num-cores"])
    return out


def target_json(target: dict) -> str:
    return json.dumps(canonical_target(target), sort_keys=True, separators=(",", ":"))


def target_slug(target: dict) -> str:
    """A directory name for the target (``llvm-rocketlake-2c``); its full JSON lives in the files."""
    parts = [str(target.get(k)) for k in ("kind", "mcpu", "arch") if target.get(k)]
    if target.get("num-cores"):
        parts.append(f"{int(target['num-cores'])}c")
    return re.sub(r"[^a-z0-9]+", "-", "-".join(parts).lower()).strip("-")[:80] or "target"


def has_records(database_dir) -> bool:
    path = Path(database_dir) / RECORDS
    return path.is_file() and path.stat().st_size > 0


def read_state(database_dir) -> dict | None:
    path = Path(database_dir) / STATE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise EtaError(f"corrupt schedule database provenance {path}: {err.msg} at line {err.lineno}") from None


def write_state(database_dir, state: dict) -> None:
    from ..files import atomic_path

    with atomic_path(Path(database_dir) / STATE) as tmp:
        tmp.write_text(json.dumps(state, indent=1) + "\n")


def _record_targets(database_dir) -> set[str]:
    """The distinct targets (as compared) that the records of a database say they were tuned for."""
    seen = set()
    for rec in _iter_records(Path(database_dir) / RECORDS):
        tgt = rec[1][2] if len(rec[1]) > 2 and isinstance(rec[1][2], dict) else {}
        seen.add(json.dumps({k: tgt.get(k) for k in TARGET_KEYS if k in tgt}, sort_keys=True))
    return seen


def _matches(record_target: dict, target: dict) -> bool:
    return all(record_target.get(k) == canonical_target(target).get(k) for k in TARGET_KEYS
               if k in record_target or k in target)


def open_database(database_dir, target: dict, *, create: bool = True) -> dict:
    """Check that ``database_dir`` holds schedules for ``target`` and this TVM; return its state.

    A directory with eta's provenance for another target or TVM version is refused (one line). One
    with MetaSchedule records but no provenance (written by plain ``tune_relax``) is adopted when
    every record names this target, refused otherwise. ``create`` writes fresh provenance.
    """
    database_dir = Path(database_dir)
    state = read_state(database_dir)
    want = {"tvm_version": tvm_version(), "target": canonical_target(target)}
    if state is not None:
        if state.get("format") != FORMAT:
            raise EtaError(f"schedule database {database_dir}: unknown format {state.get('format')!r}")
        got = {"tvm_version": state.get("tvm_version"), "target": canonical_target(state.get("target") or {})}
        if got != want:
            what = [k for k in want if got[k] != want[k]]
            raise EtaError(f"schedule database {database_dir} was tuned for {target_json(got['target'])} with TVM "
                           f"{got['tvm_version']}, not {target_json(want['target'])} with TVM {want['tvm_version']} "
                           f"(different {'/'.join(what)}): use another directory or move it aside")
        return state
    if has_records(database_dir):
        foreign = [t for t in _record_targets(database_dir) if not _matches(json.loads(t), target)]
        if foreign:
            raise EtaError(f"schedule database {database_dir} has records tuned for another target ({foreign[0]}) and no "
                           f"provenance: use another directory or move it aside")
        log.info("schedule database %s has no provenance; its records name this target, adopting it", database_dir)
    state = {"format": FORMAT, **want, "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "tasks": {}, "runs": {}}
    if create:
        database_dir.mkdir(parents=True, exist_ok=True)
        write_state(database_dir, state)
    return state


def _iter_json_lines(path: Path):
    """Parsed lines of a JSON-lines file; a line being written (or torn) is skipped."""
    try:
        text = path.read_text()
    except OSError:
        return
    yield from _parsed_lines(text.splitlines())


def _parsed_lines(lines):
    for line in lines:
        if not line.strip():
            continue
        try:
            yield json.loads(line)
        except json.JSONDecodeError:
            continue


def _parsed_records(lines):
    for rec in _parsed_lines(lines):
        if isinstance(rec, list) and len(rec) == 2 and isinstance(rec[1], list) and rec[1]:
            yield rec


def _iter_records(path: Path):
    try:
        yield from _parsed_records(path.read_text().splitlines())
    except OSError:
        return


_BEST_CACHE: dict[str, tuple] = {}


def files_stamp(database_dir) -> tuple:
    """(size, modification time) of the database's two files: what a parsed copy is valid for."""
    d = Path(database_dir)
    return tuple((p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else None for p in (d / WORKLOADS, d / RECORDS))


def best_records(database_dir) -> dict[str, str]:
    """Workload structural hash -> the JSON of its fastest valid record (what TVM applies).

    Re-read only when a database file changed (size or modification time).
    """
    database_dir = Path(database_dir)
    wl_path, rec_path = database_dir / WORKLOADS, database_dir / RECORDS
    stamp = files_stamp(database_dir)
    cached = _BEST_CACHE.get(str(database_dir))
    if cached and cached[0] == stamp:
        return cached[1]
    hashes = [w[0] if isinstance(w, list) and w else None for w in _iter_json_lines(wl_path)]
    best: dict[str, tuple[float, str]] = {}
    for index, record in _iter_records(rec_path):
        run_secs = record[1] if len(record) > 1 else None
        if not isinstance(index, int) or index >= len(hashes) or not run_secs:
            continue
        if not all(isinstance(s, (int, float)) and s < FAILED_S for s in run_secs):
            continue
        mean = sum(run_secs) / len(run_secs)
        h = str(hashes[index])
        if h not in best or mean < best[h][0]:  # ties: the earlier record, as TVM's sorted set keeps it
            best[h] = (mean, json.dumps(record[0], separators=(",", ":")))
    out = {h: trace for h, (_, trace) in best.items()}
    _BEST_CACHE[str(database_dir)] = (stamp, out)
    return out


def schedule_digest(database_dir, workload_hashes) -> str:
    """A digest of the schedules that apply to these workloads (their best records, or none)."""
    best = best_records(database_dir)
    h = hashlib.sha256()
    for w in sorted(set(str(x) for x in workload_hashes)):
        h.update(f"{w}={best.get(w, '-')}\n".encode())
    return h.hexdigest()[:20]


def tuned_hashes(database_dir) -> set[str]:
    """Workloads with at least one valid record."""
    return set(best_records(database_dir))


def merge(source_dir, database_dir) -> int:
    """Append the records of the database at ``source_dir`` (tuned elsewhere: another Ray node, another machine of
    the same target) to ``database_dir``, each under its workload there (added when new); returns how many."""
    source_dir = Path(source_dir)
    return merge_lines((source_dir / WORKLOADS).read_text(), (source_dir / RECORDS).read_text(), database_dir)


def merge_lines(workloads: str, records: str, database_dir) -> int:
    """``merge`` of a database's two files given as their text (what a Ray task sends back)."""
    database_dir = Path(database_dir)
    src_lines = [line for line in workloads.splitlines() if line.strip()]
    src_hashes = [json.loads(line)[0] for line in src_lines]
    dst_path = database_dir / WORKLOADS
    dst_lines = [line for line in dst_path.read_text().splitlines() if line.strip()] if dst_path.is_file() else []
    index = {}
    for i, line in enumerate(dst_lines):
        for w in _parsed_lines([line]):  # a torn line keeps its place and names no workload
            if isinstance(w, list) and w:
                index[str(w[0])] = i
    new_workloads, new_records, foreign = [], [], 0
    for k, record in _parsed_records(records.splitlines()):
        if not isinstance(k, int) or k >= len(src_hashes):
            continue
        h = str(src_hashes[k])
        if h not in index:
            index[h] = len(dst_lines) + len(new_workloads)
            new_workloads.append(src_lines[k])
        elif index[h] < len(dst_lines) and dst_lines[index[h]] != src_lines[k]:
            # the same structure under other block names: its traces would not replay on the workload stored here
            foreign += 1
            continue
        new_records.append(json.dumps([index[h], record], separators=(",", ":")))
    if foreign:
        log.warning("merging into %s: %d records left out, found on another copy of a workload stored there (other block "
                    "names: their traces would not replay)", database_dir, foreign)
    database_dir.mkdir(parents=True, exist_ok=True)
    with open(dst_path, "a") as f:
        f.writelines(line + "\n" for line in new_workloads)
    with open(database_dir / RECORDS, "a") as f:
        f.writelines(line + "\n" for line in new_records)
    return len(new_records)


def pack(database_dir, dest) -> dict:
    """Write the part of a database worth shipping to ``dest``: each workload's best record and the workloads
    they name (gzipped: MetaSchedule keeps each workload's whole IR), the provenance and the trials spent.

    What ``schedule_digest`` sees is unchanged: the best record of every workload is kept as it is.
    ``unpack`` turns ``dest`` back into a database MetaSchedule reads.
    """
    import gzip

    database_dir, dest = Path(database_dir), Path(dest)
    state = read_state(database_dir)
    if state is None:
        raise EtaError(f"schedule database {database_dir}: no {STATE}; only a database eta tuned can be packed")
    workloads = [line for line in (database_dir / WORKLOADS).read_text().splitlines() if line.strip()]
    hashes = [json.loads(w)[0] for w in workloads]
    best = best_records(database_dir)
    keep = [i for i, h in enumerate(hashes) if str(h) in best]
    best_lines = {}
    for index, record in _iter_records(database_dir / RECORDS):
        h = str(hashes[index]) if isinstance(index, int) and index < len(hashes) else None
        if h in best and h not in best_lines and json.dumps(record[0], separators=(",", ":")) == best[h]:
            best_lines[h] = record
    dest.mkdir(parents=True, exist_ok=True)
    with gzip.open(dest / (WORKLOADS + ".gz"), "wt") as f:
        f.writelines(workloads[i] + "\n" for i in keep)
    new_index = {str(hashes[i]): k for k, i in enumerate(keep)}
    (dest / RECORDS).write_text("".join(json.dumps([new_index[h], rec], separators=(",", ":")) + "\n"
                                        for h, rec in sorted(best_lines.items(), key=lambda kv: new_index[kv[0]])))
    # trials spent per task travel (a shipped task is not tuned again from nothing); the tuning runs are this machine's
    (dest / STATE).write_text(json.dumps({**state, "runs": {}}, indent=1))
    return {"workloads": len(keep), "records": len(best_lines)}


def unpack(packed_dir, database_dir) -> None:
    """A database MetaSchedule reads, in ``database_dir``, from what ``pack`` wrote (or a plain database copied)."""
    import gzip
    import shutil

    packed_dir, database_dir = Path(packed_dir), Path(database_dir)
    database_dir.mkdir(parents=True, exist_ok=True)
    for p in packed_dir.iterdir():
        if p.name.endswith(".gz"):
            with gzip.open(p, "rb") as src, open(database_dir / p.name[:-3], "wb") as dst:
                shutil.copyfileobj(src, dst)
        elif p.is_file():
            shutil.copyfile(p, database_dir / p.name)
