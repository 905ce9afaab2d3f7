"""Jobs: the queues (rq or in-process), leases, the runner, the job kinds (jobs/registry.py) and the job bodies.

The job bodies (sync, extraction, finetune, rounds, ping) import the shared modules (resources, chain, alignment)
and never each other; importing this package loads none of them.
"""
