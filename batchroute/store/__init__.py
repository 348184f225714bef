"""The SQL store: the source of truth for batches, jobs and attempts.

The broker only carries (job id, attempt number). Everything else lives here,
so a lost broker message never loses a job, and a duplicated message is
harmless: a worker must *claim* the job for that attempt number with a
conditional UPDATE before it spends anything.
"""


from __future__ import annotations

from batchroute.store.access import Store
from batchroute.store.engine import (
    DEFAULT_DATABASE_URL,
    _engines,
    _engines_lock,
    autocommit_engine,
    database_url,
    engine_url,
    get_engine,
)
from batchroute.store.statements import Move
from batchroute.store.tables import (
    BATCHED,
    CANCELLED,
    DEFAULT_LEASE_S,
    FAILED,
    FINISHED,
    LOST,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    Attempt,
    Batch,
    Job,
    LineError,
    ProviderBatch,
    lease_seconds,
    utcnow,
)

__all__ = [
    "BATCHED", "CANCELLED", "DEFAULT_DATABASE_URL", "DEFAULT_LEASE_S", "FAILED", "FINISHED",
    "LOST", "QUEUED", "RUNNING", "SUCCEEDED", "Attempt", "Batch", "Job",
    "LineError", "Move", "ProviderBatch", "Store", "_engines", "_engines_lock",
    "autocommit_engine", "database_url", "engine_url", "get_engine", "lease_seconds", "utcnow",
]
