"""afina's records: data files, runs and their stages, events, model versions and aliases.

    from afina.store import open_store

    with open_store() as store:        # AFINA_DATABASE_URL, else SQLite at AFINA_HOME/afina.db
        run = store.get_run("tickets-20261123-101500")

SQLite by default, PostgreSQL when the URL names one; the schema is migrated on first use. Callers
use `Store`'s methods and get frozen records back (`afina.store.records`); the tables
(`afina.store.tables`) stay inside this package. Who acts (`afina.store.principals`) is checked by
the permission check the store's opener hands it: `open_store(authorize=...)`.
"""

from afina.store.records import ApiKey, DataFile, Event, Job, JobEvent, Model, Run, RunData, Stage, StoredFile
from afina.store.store import Store, open_store
from afina.store.tables import DATA_ROLES, EVENT_LEVELS, JOB_STATUSES, MODEL_STATUSES, RUN_STATUSES, STAGE_NAMES, STAGE_STATUSES

__all__ = ["DATA_ROLES", "EVENT_LEVELS", "JOB_STATUSES", "MODEL_STATUSES", "RUN_STATUSES", "STAGE_NAMES",
           "STAGE_STATUSES", "ApiKey", "DataFile", "Event", "Job", "JobEvent", "Model", "Run", "RunData", "Stage",
           "Store", "StoredFile", "open_store"]
