"""The usage ledger: who used what, per client, model, tier and UTC day, kept across
restarts in the state store the deployment already has (SQLite or Redis)."""
