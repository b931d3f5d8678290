"""The job queue shared by every front end (studio UI, HTTP API): one line, one worker per device, one history."""

from .queue import ClientLimitReached, Job, JobQueue, QueueFull
from .runtime import open_queue

__all__ = ["ClientLimitReached", "Job", "JobQueue", "QueueFull", "open_queue"]
