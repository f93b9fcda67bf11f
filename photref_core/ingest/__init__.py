"""Files (and arrays) -> the store: readers, frame photometry, images; thin rules over the one planner."""

from .arrays import add_photometry, store_from_arrays
from .images import finalize_image_ingestion, ingest_image_batch, plan_image_ingestion
from .photometry import finalize_ingestion, ingest_batch, ingestion_needed, plan_ingestion
from .readers import read_frame, read_frame_header, read_image

__all__ = [
    "add_photometry",
    "finalize_image_ingestion",
    "finalize_ingestion",
    "ingest_batch",
    "ingest_image_batch",
    "ingestion_needed",
    "plan_image_ingestion",
    "plan_ingestion",
    "read_frame",
    "read_frame_header",
    "read_image",
    "store_from_arrays",
]
