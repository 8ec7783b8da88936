"""`chora batch run` as a real subprocess while NATS goes away: a restarted nats-server (file
store, same port), a connection cut while the batch completes, and Ctrl-C. The generator and
the assembler run in-process on the same server."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import sys

import pytest

from bus.topology import Topology, provision
from contracts.catalogue import BATCH_COMPLETED
from tests.conftest import child_env, wait_for
from tests.integration.test_assembler_batches import count_stored, running

CHORA = [sys.executable, "-m", "chora"]


class Cli:
    """A `chora` subprocess whose stderr is read line by line as it comes."""

    def __init__(self, proc: asyncio.subprocess.Process):
        self.proc = proc
        self.err: list[str] = []
        self.out = ""
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def start(cls, settings, *args: str, url: str | None = None) -> "Cli":
        env = child_env(
            NATS_URL=url or settings.nats.url,
            CHORA_HOME=str(settings.home),
            CHORA_PREFIX=settings.prefix,
            CHORA_CONFIGS_DIR=str(settings.configs_dir),
        )
        proc = await asyncio.create_subprocess_exec(
            *CHORA, *args, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        return cls(proc)

    async def _read(self) -> None:
        async def err():
            async for line in self.proc.stderr:
                self.err.append(line.decode())

        async def out():
            self.out = (await self.proc.stdout.read()).decode()

        await asyncio.gather(err(), out())

    def said(self, text: str) -> bool:
        return any(text in line for line in self.err)

    async def wait_said(self, text: str, timeout: float = 60.0) -> None:
        await wait_for(
            lambda: self.said(text) or self.proc.returncode is not None, timeout, what=f"the CLI to say {text!r}"
        )
        assert self.said(text), f"the CLI exited ({self.proc.returncode}) without saying {text!r}:\n{''.join(self.err)}"

    def batch_id(self) -> str:
        m = next(m for line in self.err if (m := re.match(r"batch (\S+): \d+ items", line)))
        return m.group(1)

    async def finish(self, timeout: float = 240.0) -> int:
        try:
            await asyncio.wait_for(self.proc.wait(), timeout)
        except asyncio.TimeoutError:
            self.proc.kill()
            raise AssertionError(f"the CLI did not finish within {timeout}s:\n{''.join(self.err)}") from None
        await self._reader
        return self.proc.returncode


def batch_file(tmp_path, n: int):
    path = tmp_path / "batch.json"
    path.write_text(
        json.dumps({"items": [{"content_config_id": "hello-world", "context": {"name": f"n{i}"}} for i in range(n)]})
    )
    return str(path)


def summary_says(out: str, n: int) -> bool:
    """The summary table: n successful, none failed."""
    return bool(re.search(rf"successful\s*\S\s*{n}\b", out)) and bool(re.search(r"failed\s*\S\s*0\b", out))


@pytest.fixture
async def provisioned(nc, settings):
    topo = Topology.from_settings(settings)
    await provision(nc.jetstream(), topo)
    return topo


@pytest.mark.timeout(300)
async def test_batch_run_reports_a_nats_restart_and_finishes_with_the_summary(
    settings, nats_server, provisioned, tmp_path
):
    n = 2000
    async with running(("generator", settings), ("assembler", settings)):
        cli = await Cli.start(settings, "batch", "run", batch_file(tmp_path, n), "--timeout", "220")
        await cli.wait_said(f": {n} items")
        nats_server.stop()  # mid-batch: 2,000 items take seconds here, the line came right after the publish
        await cli.wait_said("lost the connection to NATS")
        nats_server.restart()
        await cli.wait_said("reconnected to NATS")
        rc = await cli.finish()
    assert rc == 0, "".join(cli.err) + cli.out
    assert f"batch {cli.batch_id()}: success" in cli.out
    assert summary_says(cli.out, n), cli.out


class CuttableProxy:
    """A TCP proxy in front of the nats-server whose client side can be cut (and refused) and
    restored on the same port: a network fault for one client only."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.port = 0
        self.server: asyncio.base_events.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()

    async def _pipe(self, reader, writer):
        with contextlib.suppress(Exception):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def _serve(self, reader, writer):
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self.writers |= {writer, up_writer}
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    async def open(self) -> "CuttableProxy":
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", self.port, reuse_address=True)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def cut(self) -> None:
        self.server.close()
        await self.server.wait_closed()
        for w in self.writers:
            w.transport.abort()
        self.writers.clear()


@pytest.mark.timeout(300)
async def test_an_outcome_published_while_the_cli_was_cut_off_is_read_from_the_stream(
    settings, nats_server, nc, provisioned, tmp_path
):
    n = 20
    proxy = await CuttableProxy(int(nats_server.url.rsplit(":", 1)[1])).open()
    cli = await Cli.start(
        settings, "batch", "run", batch_file(tmp_path, n), "--timeout", "220", url=f"nats://127.0.0.1:{proxy.port}"
    )
    try:
        await cli.wait_said(f": {n} items")  # published; no service runs yet
        await proxy.cut()
        await cli.wait_said("lost the connection to NATS")
        async with running(("generator", settings), ("assembler", settings)):
            js = nc.jetstream()
            await wait_for(
                lambda: count_stored(js, provisioned, BATCH_COMPLETED),
                timeout=60,
                what="the batch_completed in the stream",
            )
        assert not cli.said("reconnected"), "the CLI found another way to the server"
        await proxy.open()  # the same port again
        rc = await cli.finish()
    finally:
        if cli.proc.returncode is None:
            cli.proc.kill()
        proxy.server.close()
    assert rc == 0, "".join(cli.err) + cli.out
    assert cli.said("reconnected to NATS")
    assert summary_says(cli.out, n), cli.out


async def test_ctrl_c_on_batch_run_names_the_batch_and_how_to_follow_it(settings, provisioned, tmp_path):
    cli = await Cli.start(settings, "batch", "run", batch_file(tmp_path, 3))  # no assembler: it waits
    await cli.wait_said(": 3 items")
    cli.proc.send_signal(signal.SIGINT)
    rc = await cli.finish(timeout=30)
    err = "".join(cli.err)
    batch_id = cli.batch_id()
    assert rc == 130, err
    assert len(batch_id) == 36 and f"chora batch status {batch_id}" in err, err
    assert "goes on on the server" in err
    assert "Traceback" not in err, err
