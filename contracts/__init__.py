"""The language every chora service speaks. Imports nothing of the project.

- ``events``: msgspec Structs, one per event type (the ``data`` of a CloudEvent);
- ``catalogue``: the one place that names every event type and its subject;
- ``envelope``: the CloudEvent envelope and its NATS binary/structured codec;
- ``tracing``: trace id and W3C traceparent propagation;
- ``schemas``: JSON Schema files generated from the Structs.
"""

from contracts.catalogue import CATALOGUE, EventSpec, spec_for, subject_for
from contracts.envelope import CloudEvent, EnvelopeError, decode, encode_binary, new_event
from contracts.events import ContentGenerated, ErrorInfo, GenerationRequested

__all__ = [
    "CATALOGUE",
    "CloudEvent",
    "ContentGenerated",
    "EnvelopeError",
    "ErrorInfo",
    "EventSpec",
    "GenerationRequested",
    "decode",
    "encode_binary",
    "new_event",
    "spec_for",
    "subject_for",
]
