"""chora_client: a typed async client of chora-compose for Python services.

It speaks the contracts (``contracts/``) over NATS with nats-py, and nothing else of
the project: requests are CloudEvents in binary mode, outcomes come back as typed
events (``event.data`` is the payload Struct), trace context goes in and out::

    from chora_client import ChoraClient

    async with await ChoraClient.connect("nats://127.0.0.1:4222") as chora:
        result = await chora.generate("hello-world", {"name": "Ada"}, timeout=30)
        if result.ok:
            print(result.content)

See :class:`ChoraClient` (generate, assemble, run_batch, outcomes) and README.md.
"""

from chora_client.client import (
    OUTCOMES,
    ArtifactResult,
    BatchResult,
    ChoraClient,
    ChoraClientError,
    GenerationResult,
    OutcomeStream,
    OutcomeTimeout,
    tls_context,
)

__all__ = [
    "OUTCOMES",
    "ArtifactResult",
    "BatchResult",
    "ChoraClient",
    "ChoraClientError",
    "GenerationResult",
    "OutcomeStream",
    "OutcomeTimeout",
    "tls_context",
]
