"""Files (and arrays) -> the store: readers, frame photometry, images; thin rules over the one planner."""

from .._lazy import lazy_exports

# name -> submodule; imported on first use (see photref_core._lazy)
_EXPORTS = {
    "add_photometry": ".arrays",
    "store_from_arrays": ".arrays",
    "finalize_image_ingestion": ".images",
    "ingest_image_batch": ".images",
    "plan_image_ingestion": ".images",
    "finalize_ingestion": ".photometry",
    "ingest_batch": ".photometry",
    "ingestion_needed": ".photometry",
    "plan_ingestion": ".photometry",
    "read_frame": ".readers",
    "read_frame_header": ".readers",
    "read_image": ".readers",
}

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

__all__ = sorted(_EXPORTS)
