"""Persistent history: every job, its request, model, seeds, timings, status and image files."""

from .sqlite import HistoryStore, ImageRecord, JobRecord

__all__ = ["HistoryStore", "ImageRecord", "JobRecord"]
