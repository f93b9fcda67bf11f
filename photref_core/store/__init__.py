"""The data model (SPEC 2): the store's layout and schema, the frame axis and its one planner, result
groups, the run lock. No science here."""

from .._lazy import lazy_exports

# name -> submodule; imported on first use (see photref_core._lazy)
_EXPORTS = {
    "consolidate": ".consolidated",
    "drop_consolidated": ".consolidated",
    "ensure_consolidated": ".consolidated",
    "is_consolidated": ".consolidated",
    "FrameBatch": ".frames",
    "FrameResult": ".frames",
    "FrameRules": ".frames",
    "IngestionPlan": ".frames",
    "ScannedFrame": ".frames",
    "frame_states": ".frames",
    "frame_table": ".frames",
    "plan_frames": ".frames",
    "summary_json": ".frames",
    "RESULTS_GROUP": ".groups",
    "group_exists": ".groups",
    "load_group": ".groups",
    "prune_results": ".groups",
    "write_group": ".groups",
    "lock_path": ".lock",
    "store_lock": ".lock",
    "store_run": ".lock",
    "INGESTED": ".schema",
    "PENDING": ".schema",
    "QUARANTINED": ".schema",
    "SCHEMA_VERSION": ".schema",
    "committed_sizes": ".schema",
    "content_version": ".schema",
    "open_dataset": ".schema",
    "open_group": ".schema",
    "open_store": ".schema",
    "store_exists": ".schema",
}

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

__all__ = sorted(_EXPORTS)
