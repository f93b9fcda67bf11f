"""Simulated fields with a known truth: frame photometry and pixel frames."""

from .images import simulate_images
from .photometry import simulate_photometry

__all__ = ["simulate_images", "simulate_photometry"]
