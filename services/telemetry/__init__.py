"""telemetry: the sink. Mirrors every chora event to JSONL and to Prometheus.

- :mod:`.sink`: :class:`JsonlSink`, one line per stream sequence, written by batches.
- :mod:`.mirror`: :class:`TelemetryMirror`, a stream message -> its line and figures
  (fed by :mod:`bus.mirror`, which reads the whole stream without acks).
- :mod:`.lines`: the line format; :mod:`.privacy`: request context as a digest unless a config opts in.
- :mod:`.metrics`: :class:`TelemetryMetrics`, its own registry and ``/metrics``.
- :mod:`.service`: :class:`TelemetryApp` and ``build(settings)``.
"""
