"""Least-privilege NATS users (deploy/nats/auth.conf) against a real nats-server.

The server runs with the very file an operator deploys, deploy/nats/single-auth.conf,
on a free port and a temp store dir; the passwords come from the environment, as in
production. Everything here uses the default prefix ``chora``, since the permissions
are written for it (each test has a server of its own, so prefixes need not differ).
That is also why the conftest ``nats_server``/``settings``/``nc`` fixtures are not used:
they start a server without users.

What is shown:
- the services run under their own users with CHORA_PROVISION=false (admin provisions):
  a request from ``client`` gets its content_generated, large content travels through the
  Object Store, the validator answers, telemetry mirrors, malformed requests are
  dead-lettered, and the server logs no permission violation;
- refusals, each checked twice (the client's error callback, and the server state that
  must not have changed): forbidden publishes, reading another service's consumer,
  deleting a stream, snooping on another user's inbox, KV keys of another service;
- a table of every user against every event, dead-letter, pull and ack subject, so a
  typo in auth.conf that opens or closes a subject shows up.
Every refusal test would fail with wide-open permissions.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import nats
import nats.errors
import nats.js.errors
import pytest

from bus.content import ContentStore
from bus.discovery import discover
from bus.publisher import Publisher
from bus.server import EmbeddedServer, server_binary
from bus.state import StateStore
from bus.topology import Topology, provision
from composition.runs import MARKERS
from bus.settings import NatsSettings
from services.settings import Settings
from contracts.catalogue import ARTIFACT_REQUESTED, CATALOGUE, CONTENT_GENERATED, GENERATION_REQUESTED, ORIGIN_KINDS
from contracts.envelope import decode, new_event
from contracts.events import ArtifactRequested, GenerationRequested
from services.runtime import ready_file, run_service
from tests.conftest import ROOT, example_configs, wait_for

NATS_DIR = ROOT / "deploy" / "nats"
AUTH_CONF = NATS_DIR / "auth.conf"
SINGLE_AUTH_CONF = NATS_DIR / "single-auth.conf"

USERS = ("admin", "generator", "telemetry", "validator", "assembler", "notifier", "client", "gateway")
EVENTS = "CHORA_EVENTS"
DURABLES = (
    "generator",
    "generator-compensations",
    "validator",
    "assembler",
    "assembler-cancels",
    "assembler-deadlines",
    "notify-release-hook",
)


# The intended table, restated independently of auth.conf: what each user may publish among
# the catalogue subjects and the dead-letter subjects.
def _of_every_kind(subject: str) -> set[str]:
    """An outcome's subjects: one per kind of run it may belong to."""
    return {f"{subject}.{kind}" for kind in ORIGIN_KINDS}


EVENT_PUBLISH = {
    "generator": {*_of_every_kind("chora.content_generated"), "chora.effects_compensated"},
    "telemetry": set(),
    "validator": {*_of_every_kind("chora.content_validated"), "chora.config_validated"},
    "assembler": {
        "chora.generation.requested",
        "chora.artifact_assembled",
        "chora.batch_completed",
        "chora.deadline.requested",
        "chora.compensation.requested",
    },
    "notifier": {"chora.notification_delivered", "chora.notification_failed"},
    # the requests, a cancel among them (docs/gateway.md: "a cancel is a request like the others")
    "client": {
        "chora.generation.requested",
        "chora.artifact.requested",
        "chora.batch.requested",
        "chora.cancel.requested",
    },
    "gateway": {
        "chora.generation.requested",
        "chora.artifact.requested",
        "chora.batch.requested",
        "chora.cancel.requested",
    },
}
# durables each user may pull from, settle (ack) and dead-letter for
OWN_DURABLES = {
    "generator": {"generator", "generator-compensations"},
    "telemetry": set(),  # it reads with an ephemeral consumer of its own, without acks
    "validator": {"validator"},
    "assembler": {"assembler", "assembler-cancels", "assembler-deadlines"},
    "notifier": {"notify-release-hook"},
    "client": set(),
    "gateway": set(),
}
FACTS = {
    "chora.content_generated.*",
    "chora.content_validated.*",
    "chora.config_validated",
    "chora.artifact_assembled",
    "chora.batch_completed",
    "chora.effects_compensated",
    "chora.notification_delivered",
    "chora.notification_failed",
}

JS_TIMEOUT = 1.0  # a forbidden JetStream API call gets no answer: it times out


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def passwords(monkeypatch) -> dict[str, str]:
    """A fresh password per user in the environment the server inherits (``p`` + hex: a
    value nats-server's config parser reads as a string; see deploy/nats/README.md)."""
    pw = {u: "p" + secrets.token_hex(16) for u in USERS}
    for u, p in pw.items():
        monkeypatch.setenv(f"CHORA_{u.upper()}_PASSWORD", p)
    return pw


@pytest.fixture
def auth_server(tmp_path, passwords):
    server = EmbeddedServer(
        tmp_path / "nats-store", config=SINGLE_AUTH_CONF, log_path=tmp_path / "nats-server.log"
    ).start()
    yield server
    server.stop()


class Conn:
    """A connection as one user, collecting what its error callback receives."""

    def __init__(self, user: str):
        self.user = user
        self.errors: list[str] = []
        self.nc: nats.NATS | None = None

    async def on_error(self, e: Exception) -> None:
        self.errors.append(str(e))

    def violations(self, kind: str = "") -> list[str]:
        """The permission violations reported so far (nats-py lowercases the server's
        "Permissions Violation for Publish to ..." / "... for Subscription to ...")."""
        return [e for e in self.errors if "permissions violation" in e.lower() and kind.lower() in e.lower()]

    def refused(self, kind: str) -> set[str]:
        """The subjects named by those violations, lowercased as nats-py reports them."""
        return {v.split('"')[1] for v in self.violations(kind)}

    def js(self, timeout: float = JS_TIMEOUT):
        return self.nc.jetstream(timeout=timeout)

    async def close(self) -> None:
        if self.nc is not None and not self.nc.is_closed:
            await self.nc.close()


@pytest.fixture
async def connect(auth_server, passwords):
    conns: list[Conn] = []

    async def _connect(user: str, *, password: str | None = None, inbox_prefix: str | None = None) -> Conn:
        c = Conn(user)
        c.nc = await nats.connect(
            auth_server.url,
            user=user,
            password=passwords[user] if password is None else password,
            inbox_prefix=inbox_prefix or f"_INBOX.{user}",
            error_cb=c.on_error,
            allow_reconnect=False,
            max_reconnect_attempts=0,
        )
        conns.append(c)
        return c

    yield _connect
    for c in conns:
        await c.close()


def make_settings(tmp_path: Path, server: EmbeddedServer, user: str, password: str, **kw) -> Settings:
    return Settings(
        home=tmp_path / "var",
        prefix="chora",
        configs_dir=example_configs(),
        metrics_port=0,
        provision=False,
        nats=NatsSettings(url=server.url, user=user, password=password, max_reconnect_attempts=1),
        **kw,
    )


@pytest.fixture
async def provisioned(tmp_path, auth_server, passwords, connect):
    """The topology, provisioned by admin (with the notifier's one webhook durable), as the
    operator does with `chora nats provision`."""
    admin = await connect("admin")
    topo = Topology.from_settings(make_settings(tmp_path, auth_server, "admin", passwords["admin"]))
    notify = topo.consumer_spec("notify-release-hook", (CONTENT_GENERATED,))
    await provision(admin.js(10), topo, extra=[notify])
    return admin, topo


def request(config_id: str = "hello-world", **ctx):
    return new_event(
        GENERATION_REQUESTED, GenerationRequested(content_config_id=config_id, context=ctx), source="urn:test"
    )


async def subject_count(admin: Conn, subject: str) -> int:
    info = await admin.js(10).stream_info(
        EVENTS if not subject.startswith("chora.dlq.") else "CHORA_DLQ", subjects_filter=subject
    )
    return sum((info.state.subjects or {}).values())  # every subject the filter matches


async def refused(aw, conn: Conn, subject: str) -> None:
    """Run a JetStream call that must be refused: the user's error callback names ``subject``
    (a subject the server dropped: no answer can come any more, so the call is then
    cancelled instead of waiting for its timeout), and the call never succeeds."""
    task = asyncio.ensure_future(aw)

    def violated() -> bool:
        return any(r.startswith(subject.lower()) for r in conn.refused("Publish"))

    try:
        await wait_for(lambda: violated() or task.done(), 10, f"{conn.user}: violation on {subject}")
        if task.done():
            assert task.exception() is not None, f"{conn.user}: {subject} was allowed"
            await wait_for(violated, 5, f"{conn.user}: violation on {subject}")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def synced(admin: Conn) -> None:
    """Wait until the server has processed everything ``admin`` sent so far.

    nats-py 2.16's ``flush()`` writes its PING straight to the socket, ahead of commands
    still buffered (a SUB just made), so its PONG does not prove those reached the server.
    A message to ourselves does: it leaves after them on the same connection."""
    subject = f"_INBOX.admin.sync.{secrets.token_hex(6)}"
    sub = await admin.nc.subscribe(subject)
    await admin.nc.publish(subject, b"")
    await sub.next_msg(timeout=5)
    await sub.unsubscribe()


# --------------------------------------------------------------------------- the config files


def test_config_files_pass_nats_server_check_and_need_every_password(passwords):
    for conf in (SINGLE_AUTH_CONF, AUTH_CONF):
        r = subprocess.run([server_binary(), "-t", "-c", str(conf)], capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "is valid" in r.stdout + r.stderr
    text = AUTH_CONF.read_text()
    for u in USERS:
        assert f"password: $CHORA_{u.upper()}_PASSWORD" in text  # from the environment, never in the file
        env = {k: v for k, v in os.environ.items() if k != f"CHORA_{u.upper()}_PASSWORD"}
        r = subprocess.run(
            [server_binary(), "-t", "-c", str(SINGLE_AUTH_CONF)], capture_output=True, text=True, timeout=30, env=env
        )
        assert r.returncode != 0, f"the config loads without CHORA_{u.upper()}_PASSWORD"
        assert f"CHORA_{u.upper()}_PASSWORD" in r.stdout + r.stderr
    # the tests (and chora up) pass listen address, ports and store dir on the command line
    body = "\n".join(line.split("#")[0] for line in SINGLE_AUTH_CONF.read_text().splitlines())
    for key in ("listen", "port:", "store_dir", "http:"):
        assert key not in body


async def test_no_credentials_or_wrong_password_is_refused(auth_server, passwords, caplog):
    caplog.set_level(logging.DEBUG)
    attempts = [
        {},
        {"user": "client", "password": "wrong"},
        {"user": "client", "password": passwords["admin"]},  # another user's password
        {"user": "nobody", "password": passwords["client"]},
        {"token": passwords["admin"]},
    ]
    for creds in attempts:
        with pytest.raises(nats.errors.Error) as info:
            await nats.connect(auth_server.url, allow_reconnect=False, max_reconnect_attempts=0, **creds)
        assert "Authorization Violation" in str(info.value), (creds, info.value)
        assert not any(pw in str(info.value) for pw in passwords.values())
    assert not any(pw in caplog.text for pw in passwords.values())


# --------------------------------------------------------------------------- the services work


@pytest.fixture
def webhook():
    """A real local HTTP endpoint recording what it is sent."""
    received: list[dict] = []

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            received.append({"headers": dict(self.headers), "body": body})
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook", received
    server.shutdown()
    server.server_close()


async def test_services_work_with_their_own_users_and_provision_off(
    tmp_path, auth_server, passwords, provisioned, connect, webhook, monkeypatch, caplog
):
    caplog.set_level(logging.DEBUG)
    admin, topo = provisioned
    url, posts = webhook
    hooks = tmp_path / "notifier.yaml"
    hooks.write_text(
        f"subscriptions:\n  - name: release-hook\n    events: [{CONTENT_GENERATED}]\n"
        f"    url: {url}\n    secret_env: TEST_HOOK_SECRET\n"
    )
    monkeypatch.setenv("TEST_HOOK_SECRET", "s" + secrets.token_hex(16))
    stops: dict[str, asyncio.Event] = {}
    tasks: dict[str, asyncio.Task] = {}
    per_service: dict[str, Settings] = {}
    for name in ("generator", "validator", "telemetry", "notifier"):
        # a tiny threshold: every content goes through the Object Store by reference
        s = make_settings(
            tmp_path, auth_server, name, passwords[name], content_threshold_bytes=16, notifier_config=hooks
        )
        per_service[name] = s
        stops[name] = asyncio.Event()
        tasks[name] = asyncio.create_task(run_service(name, s, stop=stops[name]))
    try:
        for name, s in per_service.items():
            await wait_for(
                lambda s=s, name=name: ready_file(s, name).exists() or tasks[name].done(), 20, f"{name} ready"
            )
            assert not tasks[name].done(), f"{name} stopped at start: {tasks[name].exception()!r}"

        client = await connect("client")
        # discovery under least privilege: every service answers the client's $SRV requests and
        # its own health endpoint (allow_responses), on the client's inbox
        found = await discover(client.nc, window=0.5, prefix="chora")
        assert sorted(i.service for i in found) == sorted(per_service)
        assert all(i.endpoints and i.stats and i.health is not None for i in found), found

        outcomes: dict[str, object] = {}

        async def on_fact(msg) -> None:
            ev = decode(msg.headers, msg.data)
            outcomes[ev.type] = ev

        await client.nc.subscribe("chora.content_generated.*", cb=on_fact)
        await client.nc.subscribe("chora.content_validated.*", cb=on_fact)
        await client.nc.subscribe("chora.notification_delivered", cb=on_fact)
        await client.nc.subscribe("chora.notification_failed", cb=on_fact)
        # with a callback (refused: callbacks are off here): the notifier refuses it as it reads
        # the request, under its own user
        req = new_event(
            GENERATION_REQUESTED,
            GenerationRequested(content_config_id="hello-world", context={"name": "Grace"}, callback_url=url),
            source="urn:test",
        )
        ack = await Publisher(client.js(10), "chora").publish(req)
        assert ack.stream == EVENTS

        await wait_for(lambda: "chora.content_generated" in outcomes, 20, "content_generated at the client")
        generated = outcomes["chora.content_generated"].data
        assert generated.request_id == req.id and generated.status == "success", generated
        # the generator wrote it to the Object Store; the client (read-only there) reads it back
        assert generated.content is None and generated.content_ref
        content = (await ContentStore(client.js(10), topo.content_bucket).get(generated.content_ref)).decode()
        assert content.startswith("# Hello, Grace!")

        # the validator read that content (by reference) and carried it on (by reference)
        await wait_for(lambda: "chora.content_validated" in outcomes, 20, "content_validated at the client")
        validated = outcomes["chora.content_validated"].data
        assert validated.request_id == req.id
        assert validated.valid, validated.issues
        assert validated.content_ref and validated.content is None

        # the notifier pulled from its notify-<name> durable, read the content by reference and
        # POSTed it, then announced the delivery
        await wait_for(lambda: "chora.notification_delivered" in outcomes, 20, "notification_delivered at the client")
        delivered = outcomes["chora.notification_delivered"].data
        assert delivered.subscription == "release-hook" and delivered.status_code == 204
        assert len(posts) == 1 and json.loads(posts[0]["body"])["data"]["content"] == content  # structured mode
        await wait_for(lambda: "chora.notification_failed" in outcomes, 20, "the refused callback's notification")
        refused = outcomes["chora.notification_failed"].data
        assert refused.subscription == "callback" and refused.error.code == "CALLBACK_REFUSED"
        assert refused.event_id == req.id and refused.event_type == GENERATION_REQUESTED and len(posts) == 1

        # telemetry mirrored them all (content by reference stays a reference: content_ref)
        jsonl = per_service["telemetry"].jsonl_path

        def mirrored() -> list[dict]:
            if not jsonl.exists():
                return []
            return [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]

        # (and the config_validated of each example config: the validator's scan at start
        # publishes them under its own user)
        expected = {
            GENERATION_REQUESTED,
            "chora.content_generated",
            "chora.content_validated",
            "chora.notification_delivered",
            "chora.notification_failed",
            "chora.config_validated",
        }
        await wait_for(
            lambda: {r["event_type"] for r in mirrored()} >= expected, 20, "those events in the telemetry JSONL"
        )

        # a malformed request: the generator dead-letters it, telemetry mirrors it as malformed
        await client.js(10).publish(
            "chora.generation.requested",
            b"{not json",
            headers={
                "ce-specversion": "1.0",
                "ce-id": "bad-1",
                "ce-source": "urn:test",
                "ce-type": GENERATION_REQUESTED,
            },
        )

        async def dead_lettered() -> bool:
            return await subject_count(admin, "chora.dlq.generator") == 1

        await wait_for(dead_lettered, 20, "the generator's dead letter")
        await wait_for(
            lambda: any(r["status"] == "malformed" and r["event_id"] == "bad-1" for r in mirrored()),
            20,
            "the malformed line in the telemetry JSONL",
        )
        assert await subject_count(admin, "chora.dlq.telemetry") == 0
    finally:
        for name in stops:
            stops[name].set()
        done, pending = await asyncio.wait(tasks.values(), timeout=30)
        for t in pending:  # stuck (e.g. connecting with refused credentials): do not hang the suite
            t.cancel()
        results = await asyncio.gather(*tasks.values(), return_exceptions=True)
    assert not pending and all(r is None for r in results), results
    # nothing the services did needed more than their users allow
    log = (tmp_path / "nats-server.log").read_text()
    assert "Violation" not in log, [line for line in log.splitlines() if "Violation" in line]
    assert not [r for r in caplog.records if "permissions violation" in r.getMessage().lower()]
    # and with the client's own inbox prefix nothing was refused either
    assert client.errors == []
    # no password in anything the services logged (DEBUG and up, every logger)
    assert caplog.records
    for user, pw in passwords.items():
        assert pw not in caplog.text, f"{user}'s password is in the logs"


# --------------------------------------------------------------------------- refusals


async def test_generator_cannot_publish_another_services_event(provisioned, connect):
    admin, _ = provisioned
    gen = await connect("generator")
    await gen.nc.publish("chora.batch_completed", b'{"batch_id": "forged"}')
    await gen.nc.flush()
    await wait_for(lambda: gen.violations("Publish"), 5, "the generator's error callback")
    assert 'permissions violation for publish to "chora.batch_completed"' in gen.violations()[0].lower()
    assert await subject_count(admin, "chora.batch_completed") == 0
    # through JetStream too: no PubAck, nothing stored
    with pytest.raises(nats.errors.TimeoutError):
        await gen.js().publish("chora.batch_completed", b'{"batch_id": "forged"}')
    assert await subject_count(admin, "chora.batch_completed") == 0
    # the connection is still usable for what it may do
    await gen.js(10).publish("chora.content_generated.standalone", b"{}")
    assert await subject_count(admin, "chora.content_generated.*") == 1


async def test_generator_cannot_read_the_assemblers_consumer(provisioned, connect):
    admin, topo = provisioned
    await Publisher(admin.js(10), "chora").publish(
        new_event(ARTIFACT_REQUESTED, ArtifactRequested(artifact_id="release"), source="urn:test")
    )
    gen = await connect("generator")
    got: list = []

    async def on_msg(msg):
        got.append(msg)

    inbox = gen.nc.new_inbox()
    await gen.nc.subscribe(inbox, cb=on_msg)
    # a pull request on the assembler's durable, as the consumer loop would make it
    await gen.nc.publish(
        f"$JS.API.CONSUMER.MSG.NEXT.{EVENTS}.assembler", b'{"batch": 10, "expires": 500000000}', reply=inbox
    )
    await wait_for(lambda: gen.violations("Publish"), 5, "violation on the pull request")
    assert gen.refused("Publish") == {f"$JS.API.CONSUMER.MSG.NEXT.{EVENTS}.assembler".lower()}
    # nor through a consumer of its own
    await refused(
        gen.js().add_consumer(EVENTS, durable_name="sneaky"), gen, f"$JS.API.CONSUMER.DURABLE.CREATE.{EVENTS}.sneaky"
    )
    await refused(gen.js().consumer_info(EVENTS, "assembler"), gen, f"$JS.API.CONSUMER.INFO.{EVENTS}.assembler")
    # the assembler's message is still there, undelivered
    ci = await admin.js(10).consumer_info(EVENTS, "assembler")
    assert ci.num_pending == 1 and ci.num_ack_pending == 0 and ci.delivered.stream_seq == 0
    assert got == []


async def test_client_cannot_publish_facts_nor_read_requests_or_other_inboxes(provisioned, connect):
    admin, _ = provisioned
    client = await connect("client")
    await client.nc.publish("chora.content_generated.standalone", b'{"request_id": "forged"}')
    await client.nc.flush()
    await wait_for(lambda: client.violations("Publish"), 5, "the client's error callback")
    assert 'permissions violation for publish to "chora.content_generated.standalone"' in client.violations()[0].lower()
    assert await subject_count(admin, "chora.content_generated.*") == 0
    # requests of other teams are not for the client to read, nor are the services' inboxes
    refused_subs = [
        await client.nc.subscribe(subject)
        for subject in (
            "chora.generation.requested",
            "chora.>",
            "_INBOX.generator.>",
            "_INBOX.>",
            "$KV.CHORA_STATE.>",
            ">",
        )
    ]
    await client.nc.flush()
    await wait_for(lambda: len(client.violations("Subscription")) == 6, 5, "six subscription violations")
    # its own inbox prefix and the facts are fine
    got: list[str] = []

    async def cb(msg):
        got.append(msg.subject)

    await client.nc.subscribe("chora.content_validated.*", cb=cb)
    await client.nc.subscribe("_INBOX.client.x", cb=cb)

    async def delivered() -> bool:
        # Republished until seen: the client's SUBs may reach the server after its flush()
        # returns (see synced()). First what the refused subscriptions would have matched,
        # then what the allowed ones match: one publisher, one subscriber connection, so once
        # the latter arrived the former would have too.
        for subject in ("chora.generation.requested", "_INBOX.generator.x", "$KV.CHORA_STATE.batch.b1"):
            await admin.nc.publish(subject, b"{}")
        await admin.nc.publish("chora.content_validated.batch", b"{}")
        await admin.nc.publish("_INBOX.client.x", b"{}")
        await synced(admin)
        return {"chora.content_validated.batch", "_INBOX.client.x"} <= set(got)

    await wait_for(delivered, 5, "the allowed subscriptions to receive")
    assert set(got) == {"_INBOX.client.x", "chora.content_validated.batch"}, (got, client.errors)
    assert [sub.pending_msgs for sub in refused_subs] == [0] * 6
    assert len(client.violations("Subscription")) == 6


async def test_only_admin_can_delete_or_purge_a_stream(provisioned, connect):
    admin, topo = provisioned
    conns = [await connect(u) for u in USERS if u != "admin"]

    async def attempt(c: Conn) -> None:
        js = c.js()
        await refused(js.delete_stream(EVENTS), c, f"$JS.API.STREAM.DELETE.{EVENTS}")
        await refused(js.purge_stream(topo.dlq_stream), c, f"$JS.API.STREAM.PURGE.{topo.dlq_stream}")
        await refused(js.delete_consumer(EVENTS, "generator"), c, f"$JS.API.CONSUMER.DELETE.{EVENTS}.generator")
        await refused(js.delete_key_value(topo.state_bucket), c, f"$JS.API.STREAM.DELETE.KV_{topo.state_bucket}")

    await asyncio.gather(*(attempt(c) for c in conns))
    info = await admin.js(10).stream_info(EVENTS)
    assert info.config.name == EVENTS
    assert {c.name for c in await admin.js(10).consumers_info(EVENTS)} >= set(DURABLES)
    await admin.js(10).key_value(topo.state_bucket)
    # positive control: the very same call works for admin
    assert await admin.js(10).delete_stream(EVENTS) is True
    with pytest.raises(nats.js.errors.NotFoundError):
        await admin.js(10).stream_info(EVENTS)


# --------------------------------------------------------------------------- the table


async def test_publish_table_every_user_every_subject(auth_server, connect):
    """Core publishes (no streams needed) of every event, dead-letter, pull and ack subject
    by every service user and the client: exactly the allowed ones reach an admin
    subscriber, exactly the others are reported as violations."""
    admin = await connect("admin")
    subjects: list[str] = []
    for spec in CATALOGUE.values():
        subjects += sorted(_of_every_kind(f"chora.{spec.suffix}")) if spec.by_origin else [spec.subject()]
    for d in DURABLES:
        subjects += [f"chora.dlq.{d}", f"$JS.API.CONSUMER.MSG.NEXT.{EVENTS}.{d}", f"$JS.ACK.{EVENTS}.{d}.1.1.1.1.0"]
    subjects += [
        f"$JS.API.STREAM.DELETE.{EVENTS}",
        f"$JS.API.CONSUMER.DURABLE.CREATE.{EVENTS}.x",
        "$JS.API.STREAM.CREATE.X",
        # an ephemeral consumer of the events stream (server-named): the sink's reader, the
        # gateway's followers
        f"$JS.API.CONSUMER.CREATE.{EVENTS}",
    ]
    received: set[tuple[str, str]] = set()

    async def on_msg(msg):
        received.add((msg.data.decode(), msg.subject))

    for s in subjects:
        await admin.nc.subscribe(s, cb=on_msg)
    await synced(admin)

    def allowed(user: str, subject: str) -> bool:
        if subject in EVENT_PUBLISH[user]:
            return True
        if subject == f"$JS.API.CONSUMER.CREATE.{EVENTS}":
            return user in ("telemetry", "gateway")
        for d in OWN_DURABLES[user]:
            if subject in (
                f"chora.dlq.{d}",
                f"$JS.API.CONSUMER.MSG.NEXT.{EVENTS}.{d}",
                f"$JS.ACK.{EVENTS}.{d}.1.1.1.1.0",
            ):
                return True
        return False

    users = [u for u in USERS if u != "admin"]
    conns = {u: await connect(u) for u in users}
    for u, c in conns.items():
        for s in subjects:
            await c.nc.publish(s, u.encode())
        await c.nc.flush()
    expected = {(u, s) for u in users for s in subjects if allowed(u, s)}
    await wait_for(lambda: received >= expected, 10, "every allowed publish at the admin subscriber")
    for u, c in conns.items():
        forbidden = {s for s in subjects if not allowed(u, s)}
        await wait_for(lambda c=c, n=len(forbidden): len(c.violations("Publish")) >= n, 10, f"{u}'s violations")
        assert c.refused("Publish") == {s.lower() for s in forbidden}, u
    # flush the admin side once more: nothing forbidden slipped through late
    await admin.nc.flush()
    assert received == expected


async def test_subscribe_table_inboxes_are_private(auth_server, connect):
    """Each user may subscribe to its own inbox prefix only (and the client to facts)."""
    subjects = [f"_INBOX.{u}.>" for u in USERS] + ["_INBOX.>", "chora.>", "chora.generation.requested", ">", "$JS.>"]
    subjects += sorted(FACTS)
    users = [u for u in USERS if u != "admin"]
    conns = {u: await connect(u) for u in users}
    for c in conns.values():
        for s in subjects:
            await c.nc.subscribe(s)
        await c.nc.flush()
    for u, c in conns.items():
        ok = {f"_INBOX.{u}.>"} | (FACTS if u == "client" else set())
        forbidden = {s for s in subjects if s not in ok}
        await wait_for(lambda c=c, n=len(forbidden): len(c.violations("Subscription")) >= n, 10, f"{u}'s violations")
        assert c.refused("Subscription") == {s.lower() for s in forbidden}, u


# --------------------------------------------------------------------------- KV and Object Store


async def test_state_bucket_keys_belong_to_their_service(provisioned, connect):
    admin, topo = provisioned
    asm, val, gen = await connect("assembler"), await connect("validator"), await connect("generator")
    a = StateStore(asm.js(), topo.state_bucket)
    rev = await a.create("batch.b1", b"one")
    assert rev and await a.get("batch.b1") == (b"one", rev)
    assert await a.update("batch.b1", b"two", rev)
    await a.put("batch.b1.item.0", b"x")
    await a.put("artifact.r1", b"y")
    # the assembler may read its keys back with StateStore.items (an ordered consumer on the KV stream)
    assert await a.items("batch.b1") == {"batch.b1.item.0": b"x"}

    v = StateStore(val.js(), topo.state_bucket)
    assert await v.create("configcheck.cfg.abc", b"reported")
    assert (await v.get("configcheck.cfg.abc"))[0] == b"reported"
    # the validator cannot write the assembler's keys (the KV publish is refused: no PubAck)
    await refused(v.put("batch.b1", b"forged"), val, "$KV.CHORA_STATE.batch.b1")
    # the assembler cannot write the validator's keys
    await refused(a.put("configcheck.cfg.abc", b"forged"), asm, "$KV.CHORA_STATE.configcheck.cfg.abc")
    # the generator writes only its readiness record (capability discovery): no other key, no reads
    await refused(StateStore(gen.js(), topo.state_bucket).get("batch.b1"), gen, "$JS.API.STREAM.MSG.GET.KV_CHORA_STATE")
    await refused(StateStore(gen.js(), topo.state_bucket).put("batch.b1", b"forged"), gen, "$KV.CHORA_STATE.batch.b1")
    # nothing changed
    kv = await admin.js(10).key_value(topo.state_bucket)
    assert (await kv.get("batch.b1")).value == b"two"
    assert (await kv.get("configcheck.cfg.abc")).value == b"reported"


async def test_the_generator_follows_the_stopped_run_markers_and_nothing_else(provisioned, connect):
    admin, topo = provisioned
    asm, gen = await connect("assembler"), await connect("generator")
    a = StateStore(asm.js(), topo.state_bucket)
    await a.put("cancelled.batch.b1", b"m")  # the assembler writes the markers (composition/runs.py)
    await a.put("batch.b1", b"record")
    seen: list[tuple[str, bool]] = []
    seqs: list[int] = []

    def on_change(k: str, p: bool, s: int) -> None:
        seen.append((k, p))
        seqs.append(s)

    g = StateStore(gen.js(10), topo.state_bucket)
    sub = await g.follow(MARKERS, on_change)
    await wait_for(lambda: seen == [("cancelled.batch.b1", True)], 5, "the existing marker, followed by the generator")
    await a.put("cancelled.artifact.r2", b"m")
    await wait_for(lambda: ("cancelled.artifact.r2", True) in seen, 5, "a new marker")
    await sub.unsubscribe()
    # the follow made again from the last sequence seen (the generator's refresh) is allowed too
    sub = await g.follow(MARKERS, on_change, after_seq=max(seqs))
    await a.put("cancelled.artifact.r3", b"m")
    await wait_for(lambda: ("cancelled.artifact.r3", True) in seen, 5, "a marker after the refresh")
    await sub.unsubscribe()
    assert seen.count(("cancelled.artifact.r2", True)) == 1  # not read again by the refresh
    # a follow of anything else is refused: the filter is in the API subject
    await refused(
        StateStore(gen.js(), topo.state_bucket).follow("batch.*", lambda k, p, s: None),
        gen,
        f"$JS.API.CONSUMER.CREATE.KV_{topo.state_bucket}.",
    )
    assert all(k.startswith("cancelled.") for k, _ in seen)


async def test_content_bucket_write_and_read_rights(provisioned, connect):
    admin, topo = provisioned
    writers = ("generator", "validator", "assembler")
    readers = ("telemetry", "validator", "assembler", "notifier", "client")
    conns = {u: await connect(u) for u in USERS if u != "admin"}
    refs = {}
    for u in writers:
        refs[u] = await ContentStore(conns[u].js(), topo.content_bucket).put(f"obj-{u}", f"by {u}".encode() * 100)
        # replacing an object purges its old chunks: allowed too
        await ContentStore(conns[u].js(), topo.content_bucket).put(f"obj-{u}", f"by {u} again".encode())
    for u in readers:
        store = ContentStore(conns[u].js(), topo.content_bucket)
        for w, ref in refs.items():
            assert await store.get(ref) == f"by {w} again".encode(), (u, w)
    for u in ("telemetry", "notifier", "client"):
        await refused(
            ContentStore(conns[u].js(), topo.content_bucket).put(f"forged-{u}", b"x"), conns[u], "$O.CHORA_CONTENT."
        )
    names = {o.name for o in await (await admin.js(10).object_store(topo.content_bucket)).list()}
    assert names == {f"obj-{u}" for u in writers}


async def test_only_the_generator_counts_in_the_rate_limit_bucket(provisioned, connect):
    from services.generator.upstream import RateLimiter, UpstreamSettings

    admin, topo = provisioned
    gen, val = await connect("generator"), await connect("validator")
    limits = UpstreamSettings(requests_per_minute=5)
    limiter = RateLimiter(StateStore(gen.js(), topo.limits_bucket), limits)
    r = await limiter.reserve("claude-test-1", 100)  # create, then compare-and-set updates
    await limiter.reserve("claude-test-1", 100)
    await limiter.settle(r, 30)
    kv = await admin.js(10).key_value(topo.limits_bucket)
    assert json.loads((await kv.get(r.key)).value) == {"r": 2, "t": 130}
    # another service cannot touch the counters
    await refused(StateStore(val.js(), topo.limits_bucket).get(r.key), val, "$JS.API.STREAM.INFO.KV_CHORA_LIMITS")
