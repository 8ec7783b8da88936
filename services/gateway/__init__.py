"""The gateway: the way in for those who don't speak NATS.

- :mod:`.operations`: the transport-neutral core (:class:`~.operations.Operations`): publish a
  request, await its outcome, read batch progress and results, list configs, capabilities.
  The HTTP app and the MCP server both call it.
- :mod:`.outcomes`: one follower of the outcome subjects per process, dispatching outcomes to
  waiting requests by request id.
- :mod:`.settings`: ``CHORA_GATEWAY_*``.

It reaches the other services only through events and state, like any other consumer.
"""
