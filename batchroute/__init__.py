"""batchroute: run large LLM batches on the cheapest tier that gives acceptable answers."""

from batchroute import forksafe
from batchroute.client import AsyncClient, Client, JobFailed, JobHandle, JobResult, JobTimeout

__all__ = ["AsyncClient", "Client", "JobFailed", "JobHandle", "JobResult", "JobTimeout"]
__version__ = "0.1.0"

forksafe.install()  # engines built before a fork are not shared with the child
