"""notifier: every event matching a subscription -> a signed webhook (CloudEvents over HTTP).

- :mod:`.config`: the subscriptions file (pydantic) and the secrets from the environment;
- :mod:`.signing`: Standard Webhooks signatures (``webhook-id``/``-timestamp``/``-signature``), secrets;
- :mod:`.circuit`: :class:`CircuitBreaker`, one per subscription;
- :mod:`.delivery`: :class:`WebhookSender` (CloudEvents SDK structured mode, httpx), backoff, Retry-After;
- :mod:`.handlers`: :func:`notify`, the handler (one delivery attempt);
- :mod:`.service`: :class:`NotifierApp` and ``build(settings)``: one durable consumer per subscription.
"""
