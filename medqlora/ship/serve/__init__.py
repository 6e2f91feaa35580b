"""`medqlora serve`: the HTTP API (api), the batching engine (engine), Prometheus metrics
(metrics)."""
