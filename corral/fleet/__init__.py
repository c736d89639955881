"""What Corral knows about its fleet: backends, the models each holds (resident,
loading, with their context length and the requests running on them), learned load
and service times, and recent demand per model. Read by the scheduler and the
router; written only by the events that teach it something (probes, dispatches,
answers). No I/O here and no clock: ``now`` is always a parameter."""
