"""The frame axis, shared by every kind of frame (photometry tables, images): one planner
(:func:`plan_frames`), slots, writer batches, completion markers and their one-chunk copy, the finaliser.

See :mod:`photref_core.store.schema` for the layout and why writers never share a chunk.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import BadInputError, retry_transient
from ..keys import file_identity
from .schema import INGESTED, PENDING, QUARANTINED, committed_sizes, open_store, read_whole

__all__ = [
    "FRAME_IDENTITY",
    "FrameBatch",
    "FrameResult",
    "FrameRules",
    "IngestionPlan",
    "ScannedFrame",
    "assign_slots",
    "classify_files",
    "cut_batches",
    "finish_ingestion",
    "forget_state_copy",
    "frame_id_problem",
    "frame_states",
    "frame_table",
    "index_frames",
    "known_frames",
    "plan_frames",
    "read_states",
    "record_results",
    "retag_state_copy",
    "save_state_copy",
    "scan_files",
    "state_copy_is_current",
    "summary_json",
    "write_frame_axis",
]


@dataclass
class FrameBatch:
    """The frames one writer ingests: all in the same frame chunk, so no other writer touches it."""

    chunk: int
    slots: list[int]
    paths: list[str]
    frame_ids: list[str]


@dataclass
class IngestionPlan:
    """What :func:`plan_ingestion` decided; every field is small (paths and ids, never data)."""

    store: str
    batches: list[FrameBatch]
    skipped: list[str]  # paths already ingested with an unchanged file
    quarantined: dict[str, dict] = field(default_factory=dict)  # path -> {frame_id, reason}
    n_frames: int = 0
    n_sources: int = 0
    n_photometries: int = 0

    @property
    def n_to_ingest(self) -> int:
        return sum(len(b.slots) for b in self.batches)


@dataclass
class FrameResult:
    """Outcome of ingesting one frame."""

    path: str
    frame_id: str
    slot: int
    state: int
    reason: str | None = None
    n_measurements: int = 0


_STATE_COPY = "frame_state_copy"


_STATE_COPY_CHUNK = 2**20


def state_copy_is_current(group) -> bool:
    """Whether ``frame_state_copy`` holds the markers of the store's current content version."""
    tag = group.attrs.get(_STATE_COPY)
    return tag is not None and tag == group.attrs.get("content_version")


def frame_states(group, n_frames: int | None = None) -> np.ndarray:
    """The completion markers (``frame_state``) of the first ``n_frames`` slots (default: all).

    Read from the finaliser's one-chunk copy when it matches the store's content version, else from the
    per-chunk markers themselves (see the module's notes).
    """
    return read_states(group, ())[0][:n_frames]


def read_states(group, other: Sequence[str]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The markers of every slot (as :func:`frame_states`) and the ``other`` arrays, read in one trip."""
    name = _STATE_COPY if state_copy_is_current(group) else "frame_state"
    try:
        arrays = read_whole(group, (name, "frame_id", *other))
    except FileNotFoundError:  # a tag without its copy (deleted by hand): the markers are the truth
        arrays = {}
    states = arrays.pop(name, None)
    if states is None or states.size != arrays["frame_id"].size:
        arrays = read_whole(group, ("frame_state", "frame_id", *other))
        states = arrays.pop("frame_state")
    return states, arrays


def retag_state_copy(group, previous_version: str | None, version: str) -> None:
    """Keep ``frame_state_copy`` current across a change that leaves the markers as they were (a photometry
    added to the store changes its content version, not ``frame_state``): a copy that matched
    ``previous_version`` is tagged with ``version``. Called after the new version is recorded, so a crash
    in between leaves a copy that is not used, never a wrong one."""
    if previous_version is not None and group.attrs.get(_STATE_COPY) == previous_version:
        group.attrs[_STATE_COPY] = version


def save_state_copy(group, state: np.ndarray, version: str) -> None:
    """Save the one-chunk copy of the markers and tag it with ``version`` (the tag last, so a copy cut
    short by a crash is never used)."""
    if _STATE_COPY in group:
        copy = group[_STATE_COPY]
        copy.resize(state.shape)
    else:
        copy = group.create_array(
            _STATE_COPY,
            shape=state.shape,
            chunks=(_STATE_COPY_CHUNK,),
            dtype="i1",
            fill_value=0,
            dimension_names=["frame"],
        )
    copy[:] = state
    group.attrs[_STATE_COPY] = version


def forget_state_copy(group) -> None:
    """Clear the copy's tag before the markers change (the copy is stale from now until the finaliser)."""
    if group.attrs.get(_STATE_COPY) is not None:
        group.attrs[_STATE_COPY] = None


def assign_slots(frame_ids: Sequence[str], slot_of_id: dict[str, int], n_old: int) -> tuple[list[int], int]:
    """Slots of new or changed frames: a FRAMEID already on the axis keeps its slot (re-ingestion
    overwrites it), a new one is appended. Returns the slots and the new length of the frame axis."""
    slots, next_slot = [], n_old
    for frame_id in frame_ids:
        if frame_id in slot_of_id:
            slots.append(slot_of_id[frame_id])
        else:
            slots.append(next_slot)
            next_slot += 1
    return slots, next_slot


def write_frame_axis(group, slots: Sequence[int], values: dict[str, Sequence]) -> None:
    """Write per-frame metadata (``values``: array name -> one value per slot) and reset the frames'
    markers to pending, in one read-modify-write of the slot range (no writer runs now)."""
    if not slots:
        return
    lo, hi = min(slots), max(slots) + 1
    rows = np.asarray(slots) - lo
    for name, column in values.items():
        block = group[name][lo:hi]
        for k, value in zip(rows, column, strict=True):
            block[k] = value
        group[name][lo:hi] = block
    state = group["frame_state"][lo:hi]
    state[rows] = PENDING
    group["frame_state"][lo:hi] = state


def cut_batches(
    slots: Sequence[int], paths: Sequence[str], frame_ids: Sequence[str], fpc: int
) -> list[FrameBatch]:
    """Group frames by frame chunk: one writer batch per chunk, so no two writers share a chunk."""
    by_chunk: dict[int, FrameBatch] = {}
    for slot, path, frame_id in sorted(zip(slots, paths, frame_ids, strict=True)):
        batch = by_chunk.setdefault(
            slot // fpc, FrameBatch(chunk=slot // fpc, slots=[], paths=[], frame_ids=[])
        )
        batch.slots.append(slot)
        batch.paths.append(path)
        batch.frame_ids.append(frame_id)
    return list(by_chunk.values())


FRAME_IDENTITY = ("frame_path", "frame_mtime_ns", "frame_size")


def known_frames(group) -> tuple[dict, dict, dict]:
    """What the store knows of its frames: ``{path: (slot, frame_id, state, mtime_ns, size)}``,
    ``{frame_id: slot}`` and the quarantine records (all empty for no store)."""
    if group is None:
        return {}, {}, {}
    state, arrays = read_states(group, FRAME_IDENTITY)
    return *index_frames(state, arrays), dict(group.attrs.get("quarantine", {}))


def index_frames(state: np.ndarray, arrays: dict[str, np.ndarray]) -> tuple[dict, dict]:
    """``{path: (slot, frame_id, state, mtime_ns, size)}`` and ``{frame_id: slot}`` of the frame axis."""
    known: dict[str, tuple[int, str, int, int, int]] = {}
    slot_of_id: dict[str, int] = {}
    columns = [arrays[name].tolist() for name in ("frame_id", *FRAME_IDENTITY)]
    for slot, (fid, path, mtime_ns, size, st) in enumerate(zip(*columns, state.tolist(), strict=True)):
        slot_of_id[fid] = slot
        known[path] = (slot, fid, st, mtime_ns, size)
    return known, slot_of_id


def classify_files(paths: list[str], known: dict, quarantine_prev: dict, strict: bool):
    """Split frame paths into (skipped, to_scan, identities, quarantined).

    Skipped: ingested (or quarantined) before from a file with the same path, mtime and size, so not
    opened again. Quarantined: files that cannot be stat'ed. To scan: everything else.
    """
    skipped, to_scan, identities, quarantined = [], [], {}, {}
    for path in paths:
        try:
            identities[path] = file_identity(path)
        except OSError as exc:
            reason = (
                "file does not exist"
                if isinstance(exc, FileNotFoundError)
                else (f"cannot stat the file ({exc.strerror or exc})")
            )
            if strict:
                raise BadInputError(path, reason) from exc
            quarantined[path] = {"frame_id": None, "reason": reason}
            continue
        prev = known.get(path)
        if prev is not None and prev[2] in (INGESTED, QUARANTINED) and prev[3:] == identities[path]:
            skipped.append(path)
            continue
        q = quarantine_prev.get(path)
        if (
            q is not None
            and (prev is None or prev[2] == QUARANTINED)
            and tuple(q.get("identity", ())) == identities[path]
        ):
            skipped.append(path)  # bad before, unchanged since: still bad, nothing to redo
            continue
        to_scan.append(path)
    return skipped, to_scan, identities, quarantined


@dataclass
class ScannedFrame:
    """What the pre-pass learnt of one readable file: its identity on the frame axis, and the kind's own
    header (``header``: e.g. the source ids and P of a photometry table, the shape and WCS of an image)."""

    path: str
    frame_id: str
    time: float
    header: Any = None


class FrameRules:
    """What differs between kinds of frames (photometry tables, images); :func:`plan_frames` does the rest.

    Subclasses implement the methods below; each is called once per plan, while no writer runs.
    """

    def scan(self, path: str) -> ScannedFrame:
        """Read what the plan needs of one file (cheap: headers, ids); raise ``BadInputError`` if unusable."""
        raise NotImplementedError

    def settle(self, group, scanned: list[ScannedFrame], n_paths: int) -> None:
        """Decide what the whole store shares from the readable files (P, the image shape): the store's
        value when it exists, else the majority's."""

    def problem(self, frame: ScannedFrame) -> str | None:
        """Why this readable file cannot be ingested (e.g. another P), or None."""
        return None

    def prepare(self, url: str, group, accepted: list[ScannedFrame]):
        """Create the store (group) when missing and grow every axis but the frame axis; return the group."""
        raise NotImplementedError

    def resize_frames(self, group, n_frames: int) -> None:
        """Resize every array on the frame axis to ``n_frames``."""
        raise NotImplementedError

    def drop_uncommitted(self, group) -> None:
        """Cut the axes back to the sizes of the last plan that finished."""
        raise NotImplementedError

    def frame_values(self, accepted: list[ScannedFrame]) -> dict[str, list]:
        """Per-frame values beyond the common ones (e.g. each image's WCS header)."""
        return {}

    def data_array(self, group):
        """The data array whose first chunk size is the frame chunk (the unit of one writer)."""
        raise NotImplementedError

    def finish_plan(self, group, n_frames: int) -> dict:
        """Last writes of the plan (e.g. the catalog attribute); returns the committed ``axes`` sizes."""
        return {"frames": int(n_frames)}


def scan_files(paths: Sequence[str], scan, workers: int) -> list:
    """``scan(path)`` for every path (on ``workers`` threads), a ``BadInputError`` in place of a result for
    a file that cannot be used."""

    def one(path):
        try:
            return retry_transient(scan, path)
        except BadInputError as exc:
            return exc

    if workers <= 1 or len(paths) < 8:
        return [one(p) for p in paths]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(one, paths))


def frame_id_problem(frame_id: str, path: str, seen: dict, slot_of_id: dict, known: dict) -> str | None:
    """The FRAMEID rules: one file per FRAMEID in a run, and a FRAMEID already ingested from another file
    that still exists is not taken over (the second file is quarantined, never silently merged)."""
    if frame_id in seen:
        return f"FRAMEID {frame_id!r} is also used by {seen[frame_id]}"
    if frame_id in slot_of_id and known.get(path, (None,))[0] != slot_of_id[frame_id]:
        other = next((p for p, k in known.items() if k[0] == slot_of_id[frame_id]), "?")
        if other != path and os.path.exists(other):
            return f"FRAMEID {frame_id!r} is already ingested from {other}"
    return None


def plan_frames(
    url: str, group, frame_paths: Iterable, rules: FrameRules, strict: bool = False, scan_workers: int = 2
) -> IngestionPlan:
    """THE planner, for every kind of frame: fix the axes before the fan-out, cut the writer batches.

    Rules common to every kind: a file ingested (or quarantined) before and unchanged since (same path,
    mtime and size) is skipped without being opened; a file that cannot be stat'ed (any ``OSError``) is
    quarantined with the system's message; a readable file that breaks a rule (the kind's, see
    :class:`FrameRules`, or the FRAMEID rules of :func:`frame_id_problem`) is quarantined with the reason,
    and a file ingested before that has since gone bad stops being used. The frame axis grows by the new
    frames (a FRAMEID already on the axis keeps its slot); arrays are resized here, never while writers run;
    the new sizes count only once every axis value is written (``axes`` last).

    Parameters
    ----------
    url : str
        The store (for the plan's record).
    group : zarr.Group or None
        The group of the frame axis, None when it does not exist yet (``rules.prepare`` creates it).
    frame_paths : iterable of path
        The files.
    rules : FrameRules
        The kind's rules.
    strict : bool
        Raise on the first bad file instead of quarantining it.
    scan_workers : int
        Threads of the pre-pass.

    Returns
    -------
    IngestionPlan
    """
    paths = list(dict.fromkeys(os.path.abspath(os.fspath(p)) for p in frame_paths))
    if group is not None:
        forget_state_copy(group)
        rules.drop_uncommitted(group)
    known, slot_of_id, quarantine_prev = known_frames(group)
    skipped, to_scan, identities, quarantined = classify_files(paths, known, quarantine_prev, strict)
    scanned = scan_files(to_scan, rules.scan, scan_workers)
    rules.settle(group, [s for s in scanned if isinstance(s, ScannedFrame)], len(paths))

    accepted: list[ScannedFrame] = []
    seen: dict[str, str] = {}
    bad_slots: list[int] = []
    for path, result in zip(to_scan, scanned, strict=True):
        if isinstance(result, BadInputError):
            reason = result.problem
        else:
            reason = rules.problem(result) or frame_id_problem(result.frame_id, path, seen, slot_of_id, known)
        if reason is not None:
            if strict:
                raise BadInputError(path, reason)
            fid = result.frame_id if isinstance(result, ScannedFrame) else None
            quarantined[path] = {"frame_id": fid, "reason": reason, "identity": list(identities[path])}
            if path in known:  # ingested before from a file that has since gone bad: stop using it
                bad_slots.append(known[path][0])
            continue
        seen[result.frame_id] = path
        accepted.append(result)

    group = rules.prepare(url, group, accepted)
    n_old = group["frame_id"].shape[0]
    slots, n_frames = assign_slots([f.frame_id for f in accepted], slot_of_id, n_old)
    if n_frames != n_old:
        rules.resize_frames(group, n_frames)
    write_frame_axis(
        group,
        slots,
        {
            "frame_id": [f.frame_id for f in accepted],
            "time": [f.time for f in accepted],
            "frame_path": [f.path for f in accepted],
            "frame_mtime_ns": [identities[f.path][0] for f in accepted],
            "frame_size": [identities[f.path][1] for f in accepted],
            **rules.frame_values(accepted),
        },
    )
    for slot in bad_slots:
        group["frame_state"][slot] = QUARANTINED
    batches = cut_batches(
        slots, [f.path for f in accepted], [f.frame_id for f in accepted], rules.data_array(group).chunks[0]
    )
    # Quarantine records from the scan are kept now, so the report survives a crash of the writers.
    if quarantined:
        q = dict(group.attrs.get("quarantine", {}))
        q.update(quarantined)
        group.attrs["quarantine"] = q
    axes = rules.finish_plan(group, n_frames)
    group.attrs["axes"] = axes  # last: the new sizes count only now that every axis value is written
    return IngestionPlan(
        store=url,
        batches=batches,
        skipped=skipped,
        quarantined=quarantined,
        n_frames=int(n_frames),
        n_sources=int(axes.get("sources", 0)),
    )


def record_results(group, results: Iterable[FrameResult]) -> tuple[int, int]:
    """Add the writers' quarantines to the group's ``quarantine`` record (and drop frames that are good
    again); returns (frames ingested, frames quarantined)."""
    q = dict(group.attrs.get("quarantine", {}))
    n_ok = n_bad = 0
    for r in results:
        if r.state == QUARANTINED:
            n_bad += 1
            q[r.path] = {"frame_id": r.frame_id, "reason": r.reason, "identity": list(file_identity(r.path))}
        else:
            n_ok += 1
            q.pop(r.path, None)
    group.attrs["quarantine"] = q
    return n_ok, n_bad


def finish_ingestion(group, results: Iterable[FrameResult], version, state_copy: bool = False) -> dict:
    """The end of any ingestion (frames or images): record quarantines, store the new content version
    (``version()`` computes it once the quarantines are recorded), save the one-chunk copy of the markers
    when asked (``state_copy``, the photometry store), and summarise."""
    n_ok, n_bad = record_results(group, results)
    group.attrs["content_version"] = current = version()
    state = group["frame_state"][:]
    if state_copy:
        save_state_copy(group, state, current)
    return {
        "content_version": current,
        "frames_in_store": int(state.size),
        "frames_ingested_total": int((state == INGESTED).sum()),
        "frames_quarantined_total": len(group.attrs["quarantine"]),
        "ingested_now": n_ok,
        "quarantined_now": n_bad,
    }


def frame_table(store):
    """Every frame the store knows of (ingested, quarantined, pending) plus files quarantined unread.

    Returns
    -------
    astropy.table.Table
        Columns ``frame_id``, ``path``, ``state`` ('ingested', 'quarantined', 'pending'), ``reason``,
        ``time``; used for the INMASTER HDU and the run reports.
    """
    from astropy.table import Table

    group = open_store(store)
    q = group.attrs.get("quarantine", {})
    n_frames = committed_sizes(group)[0]
    states, arrays = read_states(group, ("frame_path", "time"))
    states = states[:n_frames]
    frame_ids = arrays["frame_id"][:n_frames].tolist()
    paths = arrays["frame_path"][:n_frames].tolist()
    times = arrays["time"][:n_frames].tolist()
    state_names = np.array(["pending", "ingested", "quarantined"])[states].tolist()
    reasons = [""] * n_frames
    for slot in np.flatnonzero(states == QUARANTINED).tolist():
        reasons[slot] = q.get(paths[slot], {}).get("reason", "")
    in_store = set(paths)
    for path, rec in q.items():
        if path not in in_store:
            frame_ids.append(str(rec.get("frame_id") or os.path.basename(path)))
            paths.append(path)
            state_names.append("quarantined")
            reasons.append(rec["reason"])
            times.append(math.nan)
    columns = [frame_ids, paths, state_names, reasons]
    return Table(
        [np.array(c, dtype=str) if c else np.zeros(0, dtype=str) for c in columns]
        + [np.array(times, dtype=float)],
        names=("frame_id", "path", "state", "reason", "time"),
    )


def summary_json(summary: dict) -> str:
    """Stable JSON of a summary dictionary (for logs and artifacts)."""
    return json.dumps(summary, indent=2, sort_keys=True, default=str)
