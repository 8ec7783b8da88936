"""The AsyncAPI 3.0 document of chora's events, generated from the catalogue.

- channels: one per event type, its NATS subject (default prefix ``chora``) as the address;
- messages: CloudEvents in the NATS binding's binary mode: the attributes as ``ce-*``
  headers (the ``headers`` schema), the data as the JSON payload (the payload Struct's
  schema, the same as in ``contracts/schemas/``);
- operations: what each service receives (with its durable JetStream consumer as the NATS
  binding's ``queue``: the instances of a service share its messages; none for the
  telemetry sink, whose every instance reads the whole stream) and sends, from
  :data:`SERVICES`, the one table of who talks on which subject (a test checks it
  against bus/topology.py and the services' code);
- components.schemas: every payload Struct and the Structs inside them.

``python -m contracts.asyncapi`` (or ``chora contracts asyncapi --write``) rewrites
``contracts/asyncapi.json``; a test fails when the file drifts from the catalogue.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from contracts.catalogue import (
    ARTIFACT_ASSEMBLED,
    ARTIFACT_REQUESTED,
    BATCH_COMPLETED,
    BATCH_REQUESTED,
    CANCEL_REQUESTED,
    CATALOGUE,
    CONFIG_VALIDATED,
    CONTENT_GENERATED,
    COMPENSATION_REQUESTED,
    CONTENT_VALIDATED,
    DEADLINE_REQUESTED,
    EFFECTS_COMPENSATED,
    GENERATION_REQUESTED,
    NOTIFICATION_DELIVERED,
    NOTIFICATION_FAILED,
    CALLBACK,
    ORIGIN_KINDS,
    STANDALONE,
)

ASYNCAPI_FILE = Path(__file__).parent / "asyncapi.json"
DOCUMENT_VERSION = "0.1.0"
_ALL = tuple(CATALOGUE)
_FACTS = tuple(t for t, s in CATALOGUE.items() if s.kind == "fact")
# requests the services make of each other (the saga's timers and compensations): not for clients
_INTERNAL = (DEADLINE_REQUESTED, COMPENSATION_REQUESTED)
_REQUESTS = tuple(t for t, s in CATALOGUE.items() if s.kind == "request" and t not in _INTERNAL)


@dataclass(frozen=True)
class Role:
    """What one party receives (event type -> durable consumer, or None when every instance
    receives every event) and sends."""

    description: str
    receives: dict[str, str | None]
    sends: tuple[str, ...]
    # the origin kinds (ORIGIN_KINDS) it receives of the types split by origin, by durable (else all)
    kinds: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # the durables that receive, of the request types split by callback, only those with a callback_url
    callbacks_only: tuple[str, ...] = ()
    # whether the requests it sends may carry a callback_url (then it sends on the .callback subjects too)
    sends_callbacks: bool = False


def _on(durable: str | None, *types: str) -> dict[str, str | None]:
    return dict.fromkeys(types, durable)


SERVICES: dict[str, Role] = {
    "generator": Role(
        "Renders a content config and reports the outcome; undoes its effects (result cache entries, stored "
        "content) for a run that ended badly (see docs/saga.md).",
        _on("generator", GENERATION_REQUESTED) | _on("generator-compensations", COMPENSATION_REQUESTED),
        (CONTENT_GENERATED, EFFECTS_COMPENSATED),
    ),
    "validator": Role(
        "Checks generated content against its config's rules.",
        _on("validator", CONTENT_GENERATED),
        (CONTENT_VALIDATED, CONFIG_VALIDATED),
    ),
    "assembler": Role(
        "Turns artifacts and batches into generation requests, collects their outcomes, announces completion once.",
        _on("assembler", ARTIFACT_REQUESTED, BATCH_REQUESTED, CONTENT_GENERATED, CONTENT_VALIDATED)
        | _on("assembler-cancels", CANCEL_REQUESTED, EFFECTS_COMPENSATED)
        | _on("assembler-deadlines", DEADLINE_REQUESTED)
        | _on("assembler-completions", ARTIFACT_ASSEMBLED, BATCH_COMPLETED),
        (GENERATION_REQUESTED, ARTIFACT_ASSEMBLED, BATCH_COMPLETED, DEADLINE_REQUESTED, COMPENSATION_REQUESTED),
        {"assembler": ("artifact", "batch")},
    ),
    "notifier": Role(
        "Pushes the events its subscriptions match to webhooks (one durable consumer per subscription, notify-<name>; any event type).",
        _on("notify-<subscription>", *_ALL),
        (NOTIFICATION_DELIVERED, NOTIFICATION_FAILED),
    ),
    "notifier-callbacks": Role(
        "The notifier's per-request callbacks: records a request's callback_url, then POSTs its outcome there "
        "(signed like a webhook) and announces the delivery.",
        _on("notifier-callback-requests", GENERATION_REQUESTED, ARTIFACT_REQUESTED, BATCH_REQUESTED)
        | _on("notifier-callbacks", CONTENT_GENERATED, ARTIFACT_ASSEMBLED, BATCH_COMPLETED),
        (NOTIFICATION_DELIVERED, NOTIFICATION_FAILED),
        {"notifier-callbacks": (STANDALONE,)},
        callbacks_only=("notifier-callback-requests",),
    ),
    "telemetry": Role(
        "Mirrors every event to JSONL and Prometheus. Each instance reads the whole stream in order, "
        "without acks, and keeps its position in its own file (no shared durable consumer).",
        _on(None, *_ALL),
        (),
    ),
    "client": Role(
        "Your service, the CLI or the gateway: publishes requests and reads the outcomes "
        "(chora_client.ChoraClient in Python; any NATS client otherwise).",
        _on("<your durable>", *_FACTS),
        _REQUESTS,
        sends_callbacks=True,
    ),
}

_CE_HEADERS: dict[str, Any] = {
    "ce-specversion": {"type": "string", "const": "1.0"},
    "ce-id": {"type": "string", "description": "the event id; also Nats-Msg-Id (JetStream drops a re-published id)"},
    "ce-source": {"type": "string", "description": "who published it, e.g. chora://generator"},
    "ce-type": {"type": "string", "description": "the event type"},
    "ce-time": {"type": "string", "format": "date-time"},
    "ce-datacontenttype": {"type": "string", "const": "application/json"},
    "ce-subject": {"type": "string"},
    "ce-dataschema": {"type": "string"},
    "ce-traceid": {
        "type": "string",
        "description": "the trace id: a requester's own or the W3C one; kept by every outcome",
    },
    "ce-traceparent": {
        "type": "string",
        "pattern": "^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$",
        "description": "W3C trace context; each outcome is a child span of its cause",
    },
    "Nats-Msg-Id": {"type": "string", "description": "the same as ce-id"},
}


def _headers(event_type: str) -> dict[str, Any]:
    props = dict(_CE_HEADERS)
    props["ce-type"] = {"type": "string", "const": event_type}
    return {
        "type": "object",
        "description": "CloudEvents attributes, NATS binding, binary mode; values percent-encoded outside "
        "U+0021..U+007E and for space, '\"' and '%'. Extension attributes travel as further ce-<name> headers.",
        "required": ["ce-specversion", "ce-id", "ce-source", "ce-type"],
        "properties": props,
    }


def _channel_id(event_type: str) -> str:
    return CATALOGUE[event_type].suffix


def _message(event_type: str, payload_name: str) -> dict[str, Any]:
    spec = CATALOGUE[event_type]
    msg: dict[str, Any] = {
        "name": event_type,
        "title": payload_name,
        "summary": spec.description,
        "contentType": "application/json",
        "headers": _headers(event_type),
        "payload": {"$ref": f"#/components/schemas/{payload_name}"},
        "tags": [{"name": spec.kind}],
    }
    if "request_id" in spec.struct.__struct_fields__:
        msg["correlationId"] = {
            "description": "the ce-id of the request this outcome answers",
            "location": "$message.payload#/request_id",
        }
    return msg


def _operation(
    party: str,
    action: str,
    event_type: str,
    durable: str | None,
    kinds: tuple[str, ...] | None = None,
    callback: bool = False,
) -> dict[str, Any]:
    channel = _channel_id(event_type) + (f".{CALLBACK}" if callback else "")
    op: dict[str, Any] = {
        "action": action,
        "channel": {"$ref": f"#/channels/{channel}"},
        "summary": f"{party} {action}s {event_type}" + (" with a callback_url" if callback else ""),
        "messages": [{"$ref": f"#/channels/{channel}/messages/{CATALOGUE[event_type].struct.__name__}"}],
        "tags": [{"name": party}],
    }
    if kinds is not None and CATALOGUE[event_type].by_origin:
        op["summary"] += f" (origin_kind {' and '.join(kinds)} only)"
        op["description"] = (
            f"Its consumer filters on the subjects ending with {', '.join(kinds)}: it is never sent the others."
        )
    if durable is not None:
        op["bindings"] = {"nats": {"queue": durable, "bindingVersion": "0.1.0"}}
    return op


def document(prefix: str = "chora") -> dict[str, Any]:
    """The AsyncAPI 3.0 document (subjects under ``prefix``)."""
    structs = [spec.struct for spec in CATALOGUE.values()]
    _, components = msgspec.json.schema_components(structs, ref_template="#/components/schemas/{name}")
    channels: dict[str, Any] = {}
    messages: dict[str, Any] = {}
    for event_type, spec in CATALOGUE.items():
        name = spec.struct.__name__
        messages[event_type] = _message(event_type, name)
        channel: dict[str, Any] = {
            "address": spec.subject(prefix),
            "title": event_type,
            "description": f"{spec.description} Stored in the events stream (JetStream, limits retention).",
            "messages": {name: {"$ref": f"#/components/messages/{event_type}"}},
        }
        if spec.by_origin:
            channel["address"] = spec.subject_of(prefix, STANDALONE).rsplit(".", 1)[0] + ".{origin_kind}"
            channel["description"] += (
                " The subject's last token is the kind of run the outcome belongs to: " + ", ".join(ORIGIN_KINDS) + "; "
                f"subscribe to {spec.subject(prefix)} for all of them."
            )
            channel["parameters"] = {
                "origin_kind": {
                    "enum": list(ORIGIN_KINDS),
                    "default": STANDALONE,
                    "description": "origin.kind of the payload (artifact: a part of an artifact, batch: an item of "
                    "a batch), standalone when the request had no origin",
                    "location": "$message.payload#/origin/kind",
                }
            }
        if spec.by_callback:
            channel["description"] += (
                f" Without a callback_url; one with a callback_url travels on {spec.callback_subject(prefix)} "
                "(and is rejected with MISROUTED_CALLBACK if it comes on this subject)."
            )
            channels[_channel_id(event_type) + f".{CALLBACK}"] = {
                **channel,
                "address": spec.callback_subject(prefix),
                "description": f"{spec.description} With a callback_url: the notifier reads only this subject "
                "(to record the callback, or to refuse it while callbacks are off). Stored in the events stream "
                "(JetStream, limits retention).",
            }
        channels[_channel_id(event_type)] = channel
    operations: dict[str, Any] = {}
    for party, role in SERVICES.items():
        for event_type, durable in role.receives.items():
            name = f"{party}.receive.{_channel_id(event_type)}"
            kinds = role.kinds.get(durable or "")
            if CATALOGUE[event_type].by_callback:
                operations[f"{name}.{CALLBACK}"] = _operation(party, "receive", event_type, durable, kinds, True)
                if durable in role.callbacks_only:
                    continue
            operations[name] = _operation(party, "receive", event_type, durable, kinds)
        for event_type in role.sends:
            name = f"{party}.send.{_channel_id(event_type)}"
            operations[name] = _operation(party, "send", event_type, None)
            if CATALOGUE[event_type].by_callback and role.sends_callbacks:
                operations[f"{name}.{CALLBACK}"] = _operation(party, "send", event_type, None, callback=True)
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "chora-compose events",
            "version": DOCUMENT_VERSION,
            "description": "Event-driven content generation on NATS JetStream: requests and facts as CloudEvents "
            "(binary mode: ce-* headers, JSON data; structured mode accepted on input). A malformed or impossible "
            "message goes to the dead-letter stream on <prefix>.dlq.<consumer>. See docs/events.md.",
            "license": {"name": "Apache-2.0", "url": "https://www.apache.org/licenses/LICENSE-2.0"},
            "tags": [{"name": party, "description": role.description} for party, role in SERVICES.items()],
        },
        "defaultContentType": "application/json",
        "servers": {
            "embedded": {
                "host": "127.0.0.1:4222",
                "protocol": "nats",
                "description": "the nats-server `chora up` starts (its URL is printed; production sets NATS_URL)",
            }
        },
        "channels": channels,
        "operations": operations,
        "components": {"messages": messages, "schemas": components},
    }


def generate(prefix: str = "chora") -> str:
    return json.dumps(document(prefix), indent=2) + "\n"


def write(path: Path = ASYNCAPI_FILE) -> Path:
    path.write_text(generate())
    return path


if __name__ == "__main__":
    print(write())
    sys.exit(0)
