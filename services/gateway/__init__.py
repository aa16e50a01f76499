"""The OpenAI-compatible gateway: HTTP edge (app), request preparation, lifecycle and backends."""
