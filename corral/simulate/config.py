"""Configuration of the stand-in Ollama server.

Kept apart from ``server.py`` so the engine can import it without pulling in
the HTTP layer.
"""

from __future__ import annotations

from dataclasses import dataclass

FAULT_MODES = ("none", "oom", "hang", "drop", "refuse")
# A client's id for one request, counted per id by the stand-in (``runs_repeated`` in
# /_sim/stats): a gateway passes client headers on, so an id that arrives twice is a
# request the gateway ran twice.
RUN_ID_HEADER = "X-Sim-Run-Id"


@dataclass(frozen=True)
class SimConfig:
    """Knobs of one stand-in server; names follow the Ollama env vars they mimic."""

    host: str = "127.0.0.1"
    port: int = 11434
    # Installed models (/api/tags), in the order /api/tags lists them.
    models: tuple[str, ...] = ("llama3.2:latest", "qwen2.5:0.5b", "nomic-embed-text:latest")
    # Loaded at start (/api/ps); they are added to the installed list if missing.
    loaded: tuple[str, ...] = ()
    # OLLAMA_NUM_PARALLEL: slots per loaded model. Embedding models always get 1,
    # as Ollama forces it for them.
    parallel: int = 1
    # Generation speed; 0 means instant (no sleeps at all, for benchmarks).
    tokens_per_second: float = 50.0
    # Prompt processing speed; 0 means instant.
    prompt_tokens_per_second: float = 0.0
    # Seconds to load a model that is not loaded.
    load_time: float = 0.0
    # OLLAMA_MAX_LOADED_MODELS: loading one more evicts an idle one.
    max_loaded_models: int = 3
    # OLLAMA_MAX_QUEUE: capacity of the queue of requests waiting for a load.
    max_queue: int = 512
    # Real Ollama generates until EOS; a stand-in must end somewhere.
    default_num_predict: int = 16
    # none | oom | hang | drop | refuse
    fault: str = "none"
    # With fault=drop: chunks sent before the connection is cut.
    drop_after: int = 3
    version: str = "0.33.0"
    # OLLAMA_KEEP_ALIVE in seconds (negative = forever); Ollama's default is 5m.
    keep_alive: float = 300.0
    # Default num_ctx when a request sets none (Ollama's tier for GPUs under 23 GiB).
    num_ctx: int = 4096

    def __post_init__(self) -> None:
        # Fail at construction rather than with a confusing error mid-test.
        if self.fault not in FAULT_MODES:
            raise ValueError(f"fault must be one of {', '.join(FAULT_MODES)}, not {self.fault!r}")
        if self.parallel < 1:
            raise ValueError("parallel must be at least 1")
        if self.max_loaded_models < 1:
            raise ValueError("max_loaded_models must be at least 1")
        if self.max_queue < 0:
            raise ValueError("max_queue must not be negative")
        if self.tokens_per_second < 0 or self.prompt_tokens_per_second < 0:
            raise ValueError("token speeds must not be negative")
        if self.load_time < 0:
            raise ValueError("load_time must not be negative")
        if self.default_num_predict < 0 or self.drop_after < 0:
            raise ValueError("default_num_predict and drop_after must not be negative")
