"""Asynchronous batch jobs: ``/corral/jobs``, workers, callbacks, memory/Redis storage."""
