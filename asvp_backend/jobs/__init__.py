"""Jobs: queues (rq or in-process), leases, the runner and the job functions.

Importing the package registers every job kind (jobs/tasks.py), as timm's package import fills its model
registry, so `job_kind` never has to import the job functions itself.
"""

from asvp_backend.jobs import tasks as _tasks  # noqa: F401  (fills the registry)
