"""telemetry: the sink. Mirrors every chora event to JSONL and to Prometheus.

- :mod:`.sink`: :class:`JsonlSink`, one line per event id, group commit.
- :mod:`.lines`: the line format; :mod:`.privacy`: request context as a digest unless a config opts in.
- :mod:`.metrics`: :class:`TelemetryMetrics`, its own registry and ``/metrics``.
- :mod:`.handlers`: :func:`mirror`, the handler.
- :mod:`.service`: :class:`TelemetryApp` and ``build(settings)``.
"""
