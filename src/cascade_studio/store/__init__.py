"""Persistent history: every job, its request, model, seeds, timings, status and image files."""

from .sqlite import HistoryStore, ImageRecord, JobRecord, StoreError, TaskRecord

__all__ = ["HistoryStore", "ImageRecord", "JobRecord", "StoreError", "TaskRecord"]
