"""Stand-in Ollama server for tests, demos and benchmarks (see ``server.py``)."""
