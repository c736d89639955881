"""Scheduling across replicas: backend slots as leases in a shared store, one queue
order decided by one leader, notifications instead of polling."""
