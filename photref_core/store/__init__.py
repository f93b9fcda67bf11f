"""The data model (SPEC 2): the store's layout and schema, the frame axis and its one planner, result
groups, the run lock. No science here."""

from .frames import (
    FrameBatch,
    FrameResult,
    FrameRules,
    IngestionPlan,
    ScannedFrame,
    frame_states,
    frame_table,
    plan_frames,
    summary_json,
)
from .groups import RESULTS_GROUP, group_exists, load_group, prune_results, write_group
from .lock import lock_path, store_lock
from .schema import (
    INGESTED,
    PENDING,
    QUARANTINED,
    SCHEMA_VERSION,
    committed_sizes,
    content_version,
    open_dataset,
    open_store,
    store_exists,
)

__all__ = [
    "INGESTED",
    "PENDING",
    "QUARANTINED",
    "RESULTS_GROUP",
    "SCHEMA_VERSION",
    "FrameBatch",
    "FrameResult",
    "FrameRules",
    "IngestionPlan",
    "ScannedFrame",
    "committed_sizes",
    "content_version",
    "frame_states",
    "frame_table",
    "group_exists",
    "load_group",
    "lock_path",
    "open_dataset",
    "open_store",
    "plan_frames",
    "prune_results",
    "store_exists",
    "store_lock",
    "summary_json",
    "write_group",
]
