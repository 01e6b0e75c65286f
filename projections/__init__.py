"""The read side of jobledger: everything derived from the event log.

Modules here import only :mod:`engine.events` from the engine and receive a
connection or pool as an argument.
"""

from projections.job_state import Job, apply, replay

__all__ = ["Job", "apply", "replay"]
