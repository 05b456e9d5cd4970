"""docker-compose.yml, deploy/Dockerfile and .dockerignore, checked without a Docker engine.

The compose file is parsed by a real parser -- Debian's ``docker-compose`` (1.29), which
validates the file against the Compose schema and interpolates the variables -- and the
assertions run on what it prints.  The Dockerfile cannot be built here; its COPY sources, its
pins and the ``bnwatch`` command lines it and the compose file run are checked instead.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped]

from bnwatch.cli import build_parser

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from tests.deploy.helpers import (
    COMPOSE_FILE,
    DOCKERFILE,
    PROMETHEUS,
    ROOT,
    compose_config,
    load_yaml,
    tool,
)

SERVICES = {
    "postgres",
    "migrate",
    "api",
    "dashboard",
    "prometheus",
    "alertmanager",
    "grafana",
    "demo",
}
ONE_SHOT = {"migrate", "demo"}
"""Services that run once and exit (no health check, never restarted)."""


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    """The compose file as Debian's parser resolves it with every default."""
    parsed: dict[str, Any] = yaml.safe_load(compose_config())
    return parsed


@pytest.fixture(scope="module")
def services(config: dict[str, Any]) -> dict[str, Any]:
    found: dict[str, Any] = config["services"]
    return found


def bnwatch_services(services: Mapping[str, Any]) -> dict[str, Any]:
    """The services that run the image built from deploy/Dockerfile."""
    return {
        name: s
        for name, s in services.items()
        if Path(s.get("build", {}).get("context", "/nonexistent")) == ROOT
    }


def published_ports(service: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """(host address, host port, container port) of each port a service publishes.

    docker-compose 1.x prints ``"127.0.0.1:8000:8000/tcp"``; Compose v2 prints mappings.
    """
    out = []
    for port in service.get("ports", []):
        if isinstance(port, dict):
            out.append(
                (str(port.get("host_ip", "")), str(port.get("published", "")), str(port["target"]))
            )
            continue
        parts = str(port).split("/")[0].rsplit(":", 2)
        parts = [""] * (3 - len(parts)) + parts
        out.append((parts[0], parts[1], parts[2]))
    return out


def bind_mounts(service: Mapping[str, Any]) -> Iterator[tuple[Path, str, bool]]:
    """(host path, container path, read-only) of each bind mount (named volumes left out)."""
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            if volume.get("type") == "bind":
                yield Path(volume["source"]), volume["target"], bool(volume.get("read_only"))
            continue
        source, target, *mode = str(volume).split(":")
        if source.startswith(("/", ".")):
            yield (ROOT / source).resolve(), target, "ro" in mode


def option(command: list[str], name: str) -> str | None:
    """The value after ``name`` in an argument list (``None`` if absent)."""
    return command[command.index(name) + 1] if name in command else None


# --------------------------------------------------------------------------------------------
# The compose file
# --------------------------------------------------------------------------------------------
def test_the_stack_has_every_service(services: dict[str, Any]) -> None:
    assert set(services) == SERVICES
    assert set(bnwatch_services(services)) == {"migrate", "api", "dashboard", "demo"}
    for name, service in bnwatch_services(services).items():
        assert service["build"]["dockerfile"] == "deploy/Dockerfile", name


def test_long_running_services_have_health_checks(services: dict[str, Any]) -> None:
    for name, service in services.items():
        if name in ONE_SHOT:
            assert service["restart"] == "no", name
            continue
        assert service["restart"] == "unless-stopped", name
        check = service.get("healthcheck")
        assert check and not check.get("disable"), f"{name} has no health check"
        assert check["test"][0] in ("CMD", "CMD-SHELL") and len(check["test"]) > 1, name
        for key in ("interval", "timeout", "retries", "start_period"):
            assert key in check, f"{name}: healthcheck.{key}"


def test_health_checks_probe_the_port_the_service_listens_on(services: dict[str, Any]) -> None:
    paths = {"api": "/healthz", "dashboard": "/_stcore/health"}
    for name, path in paths.items():
        service = services[name]
        port = option(service["command"], "--port")
        assert option(service["command"], "--host") == "0.0.0.0", name  # reachable from peers
        probe = " ".join(service["healthcheck"]["test"])
        assert f"http://127.0.0.1:{port}{path}" in probe, name
        # the image has no curl or wget: the probe is Python's
        assert service["healthcheck"]["test"][1] == "python", name
        assert [p[2] for p in published_ports(service)] == [port], name
    for other, listens in (("prometheus", 9090), ("alertmanager", 9093), ("grafana", 3000)):
        probe = " ".join(services[other]["healthcheck"]["test"])
        assert f"http://127.0.0.1:{listens}/" in probe, other
        assert [p[2] for p in published_ports(services[other])] == [str(listens)], other


def test_start_order(services: dict[str, Any]) -> None:
    def condition(service: str, on: str) -> str | None:
        dependency = services[service].get("depends_on", {}).get(on)
        return None if dependency is None else str(dependency["condition"])

    assert condition("migrate", "postgres") == "service_healthy"
    for name in ("api", "dashboard"):
        assert condition(name, "migrate") == "service_completed_successfully", name
        assert condition(name, "postgres") == "service_healthy", name
    assert condition("demo", "api") == "service_healthy"
    # Prometheus starts with the api (not after it is healthy): it must see it fail
    assert condition("prometheus", "api") == "service_started"
    assert condition("prometheus", "alertmanager") == "service_started"
    assert condition("grafana", "prometheus") == "service_started"
    for name, service in services.items():
        assert set(service.get("depends_on", {})) <= SERVICES - {name}, name


def compose_seconds(duration: str) -> float:
    """A Compose duration (``1m30s``, ``60s``, ``500ms``) in seconds."""
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|s|m|h)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, duration
    unit = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
    return sum(float(n) * unit[u] for n, u in parts)


def test_stopping_the_api_leaves_its_trigger_worker_time_to_finish(
    services: dict[str, Any],
) -> None:
    """``docker compose stop`` sends SIGTERM, then SIGKILL after ``stop_grace_period`` (10 s
    by default); shutdown waits up to DEFAULT_STOP_TIMEOUT for the webhook in flight and then
    records what is queued as failed -- killed before that, claims were left pending."""
    from bnwatch.service.triggers import DEFAULT_STOP_TIMEOUT

    grace = compose_seconds(str(services["api"].get("stop_grace_period", "10s")))
    assert grace >= DEFAULT_STOP_TIMEOUT + 10, grace  # + uvicorn's and the lifespan's own


def test_ports_bind_to_localhost_unless_configured(services: dict[str, Any]) -> None:
    """By design nothing listens beyond the host's loopback until BNWATCH_BIND_ADDRESS says so.

    The stack's defaults (passwords, token, Grafana's admin/admin) are only safe there; and
    PostgreSQL publishes no port at all (the services reach it on the compose network).
    """
    published = {name: published_ports(s) for name, s in services.items()}
    assert published.pop("postgres") == []
    assert published.pop("migrate") == published.pop("demo") == []
    for name, ports in published.items():
        assert ports, name
        for host_ip, host_port, _ in ports:
            assert host_ip == "127.0.0.1", f"{name} publishes {host_port} on {host_ip or '*'}"

    everywhere = yaml.safe_load(compose_config(env={"BNWATCH_BIND_ADDRESS": "0.0.0.0"}))
    for name, ports in published.items():
        again = published_ports(everywhere["services"][name])
        assert [p[0] for p in again] == ["0.0.0.0"] * len(ports), name


def test_every_mounted_local_path_exists(services: dict[str, Any]) -> None:
    mounts = {name: list(bind_mounts(s)) for name, s in services.items()}
    assert any(mounts.values())
    for name, binds in mounts.items():
        for source, target, read_only in binds:
            assert source.exists(), f"{name} mounts {source}, which does not exist"
            assert source.is_relative_to(ROOT), f"{name} mounts {source} outside the repository"
            assert read_only, f"{name} mounts {source} at {target} writable"


def test_prometheus_gets_the_repository_config(services: dict[str, Any]) -> None:
    prometheus = services["prometheus"]
    binds = {target: source for source, target, _ in bind_mounts(prometheus)}
    assert binds["/etc/prometheus"] == PROMETHEUS
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    config = load_yaml(PROMETHEUS / "prometheus.yml")
    for rule_file in config["rule_files"]:
        assert (PROMETHEUS / rule_file).is_file(), rule_file
    # alerts go to the compose alertmanager
    (alertmanager,) = config["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"]
    host, port = alertmanager.split(":")
    assert host in services
    assert port in [p[2] for p in published_ports(services[host])]
    alertmanager_binds = {t: s for s, t, _ in bind_mounts(services["alertmanager"])}
    assert alertmanager_binds["/etc/alertmanager/alertmanager.yml"] == (
        ROOT / "deploy" / "alertmanager" / "alertmanager.yml"
    )
    # the default scrape target is the compose api
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "bnwatch"]
    groups = [g for f in job["file_sd_configs"][0]["files"] for g in load_yaml(PROMETHEUS / f)]
    targets = [t for g in groups for t in g["targets"]]
    api_port = option(services["api"]["command"], "--port")
    assert targets == [f"api:{api_port}"]


def test_alertmanager_config_is_valid() -> None:
    result = subprocess.run(
        [
            tool("amtool", "prometheus-alertmanager"),
            "check-config",
            str(ROOT / "deploy" / "alertmanager" / "alertmanager.yml"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --------------------------------------------------------------------------------------------
# Settings: ${NAME:-default} in the compose file, .env.example and docs/deploy.md agree
# --------------------------------------------------------------------------------------------
VARIABLE = re.compile(r"\$\{([^}]*)\}")


def compose_defaults() -> dict[str, str]:
    """Every ``${NAME:-default}`` of the compose file (comments left out), by name."""
    found: dict[str, str] = {}
    for line in COMPOSE_FILE.read_text().splitlines():
        if line.lstrip().startswith("#"):
            continue
        for inner in VARIABLE.findall(line.replace("$$", "")):
            name, sep, default = inner.partition(":-")
            assert sep, f"${{{inner}}} has no default: write ${{{name}:-default}}"
            assert found.setdefault(name, default) == default, f"{name}: two defaults"
    return found


def env_example() -> dict[str, str]:
    lines = (ROOT / ".env.example").read_text().splitlines()
    pairs = [line.split("=", 1) for line in lines if line.strip() and not line.startswith("#")]
    return {name.strip(): value.strip() for name, value in pairs}


def test_every_setting_has_a_documented_default() -> None:
    defaults = compose_defaults()
    assert "BNWATCH_API_TOKEN" in defaults and "BNWATCH_BIND_ADDRESS" in defaults
    assert env_example() == defaults
    docs = (ROOT / "docs" / "deploy.md").read_text()
    for name, default in defaults.items():
        cell = f"`{re.escape(default)}`" if default else "unset"  # an empty default: unset
        row = re.compile(rf"^\|\s*`{name}`\s*\|\s*{cell}\s*\|", re.MULTILINE)
        assert row.search(docs), f"docs/deploy.md has no table row | `{name}` | {cell} |"


def test_env_example_reproduces_the_defaults(config: dict[str, Any]) -> None:
    with_example = yaml.safe_load(compose_config(env_file=ROOT / ".env.example"))
    assert with_example == config


def test_compose_v2_accepts_the_file_too() -> None:
    """Where the Docker CLI's compose plugin exists (not on Debian's CI machine), it agrees."""
    docker = shutil.which("docker")
    if (
        docker is None
        or subprocess.run(
            [docker, "compose", "version"], capture_output=True, check=False
        ).returncode
    ):
        pytest.skip("no `docker compose` plugin (optional; Debian's docker-compose is the check)")
    result = subprocess.run(
        [docker, "compose", "-f", str(COMPOSE_FILE), "config", "--quiet"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr


# --------------------------------------------------------------------------------------------
# deploy/Dockerfile and .dockerignore
# --------------------------------------------------------------------------------------------
def instructions(text: str) -> list[tuple[str, str]]:
    """A Dockerfile's instructions as (KEYWORD, arguments), continuation lines joined."""
    out: list[tuple[str, str]] = []
    current = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        keyword, _, arguments = (current + line).partition(" ")
        out.append((keyword.upper(), " ".join(arguments.split())))
        current = ""
    return out


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    return instructions(DOCKERFILE.read_text())


def copy_sources(dockerfile: list[tuple[str, str]]) -> list[str]:
    """The build-context paths the Dockerfile COPYs (copies from a stage left out)."""
    sources = []
    for keyword, arguments in dockerfile:
        if keyword not in ("COPY", "ADD"):
            continue
        words = shlex.split(arguments)
        if any(w.startswith("--from") for w in words):
            continue
        sources += [w.rstrip("/") for w in words if not w.startswith("--")][:-1]
    return sources


def ignored(path: str) -> bool:
    """Whether .dockerignore keeps ``path`` (relative, ``/``-separated) out of the context.

    Docker's rules, as far as this repository uses them: the last matching pattern wins, a
    ``!`` pattern re-includes, a pattern matching a parent directory matches what is inside,
    and ``**/`` also matches no directory at all.
    """
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        body = pattern.lstrip("!").rstrip("/")
        variants = {body, body.removeprefix("**/")}
        if any(fnmatch(p, v) for p in prefixes for v in variants):
            excluded = not negated
    return excluded


def test_dockerfile_copies_existing_paths_inside_the_context(
    dockerfile: list[tuple[str, str]],
) -> None:
    sources = copy_sources(dockerfile)
    assert {"constraints.txt", "pyproject.toml", "bnwatch", "migrations"} <= set(sources)
    for source in sources:
        assert (ROOT / source).exists(), f"deploy/Dockerfile copies {source}: it does not exist"
        assert not ignored(source), f".dockerignore excludes {source}, which the image copies"
        for inner in (ROOT / source).rglob("*.py"):
            relative = inner.relative_to(ROOT).as_posix()
            assert "__pycache__" in relative or not ignored(relative), relative
    # the context stays small: the virtualenv, tests and caches are not sent to the builder
    for heavy in (".venv", ".venv/lib", "tests", ".git", "bnwatch/__pycache__", "x.db"):
        assert ignored(heavy), heavy


def test_image_gets_every_file_the_package_build_needs(
    dockerfile: list[tuple[str, str]],
) -> None:
    """Each package directory of pyproject.toml and its readme are copied into the image."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    setuptools = project["tool"]["setuptools"]
    mapping: dict[str, str] = setuptools.get("package-dir", {})
    needed = {project["project"]["readme"]}
    for package in setuptools["packages"]:
        prefixes = [p for p in mapping if package == p or package.startswith(p + ".")]
        prefix = max(prefixes, key=len) if prefixes else None
        if prefix is None:
            needed.add(package.replace(".", "/"))
        else:
            rest = package[len(prefix) :].lstrip(".").replace(".", "/")
            needed.add(f"{mapping[prefix]}/{rest}".rstrip("/"))
    sources = copy_sources(dockerfile)
    for path in needed:
        assert (ROOT / path).exists(), path
        assert any(path == s or path.startswith(s + "/") for s in sources), (
            f"pyproject.toml needs {path}; deploy/Dockerfile does not copy it"
        )


def test_image_installs_the_pinned_cpu_torch_then_bnwatch(
    dockerfile: list[tuple[str, str]],
) -> None:
    runs = [arguments for keyword, arguments in dockerfile if keyword == "RUN"]
    (torch_step,) = [i for i, r in enumerate(runs) if "download.pytorch.org/whl/cpu" in r]
    (install_step,) = [i for i, r in enumerate(runs) if "-c constraints.txt" in r]
    assert torch_step < install_step
    pin = re.search(r"^torch==(\S+)$", (ROOT / "constraints.txt").read_text(), re.MULTILINE)
    assert pin and pin.group(1) == "2.13.0"
    # the torch version is read from constraints.txt (or written out as its pin)
    assert "grep '^torch==' constraints.txt" in runs[torch_step] or (
        f"torch=={pin.group(1)}" in runs[torch_step]
    )
    extras = re.findall(r"\"\.\[([\w,-]+)\]\"", runs[install_step])
    assert extras, runs[install_step]
    defined = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    for extra in extras[0].split(","):
        assert extra in defined, f"pyproject.toml has no extra {extra!r}"
    assert "scikit-learn" in " ".join(defined[extras[0].split(",")[0]])  # `bnwatch demo`


def test_image_is_python_311_slim_and_runs_as_a_user(dockerfile: list[tuple[str, str]]) -> None:
    args = dict(a.split("=", 1) for k, a in dockerfile if k == "ARG" and "=" in a)
    bases = [a.split()[0] for k, a in dockerfile if k == "FROM"]
    resolved = [re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], b) for b in bases]
    assert resolved and all(b.startswith("python:3.11-slim") for b in resolved), resolved
    last_stage = dockerfile[max(i for i, (k, _) in enumerate(dockerfile) if k == "FROM") :]
    users = [a for k, a in last_stage if k == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), users


def test_every_command_is_a_bnwatch_command_line(
    dockerfile: list[tuple[str, str]], services: dict[str, Any]
) -> None:
    """The image's ENTRYPOINT is bnwatch; its CMD and each service's command parse with the CLI."""
    entrypoint = [json.loads(a) for k, a in dockerfile if k == "ENTRYPOINT"]
    assert entrypoint[-1] == ["bnwatch"]
    default = [json.loads(a) for k, a in dockerfile if k == "CMD"][-1]
    commands = {"CMD": default} | {
        name: s["command"] for name, s in bnwatch_services(services).items()
    }
    parser = build_parser()
    for name, command in commands.items():
        assert isinstance(command, list), f"{name}: use the exec form (a list)"
        try:
            parser.parse_args(command)
        except SystemExit:
            pytest.fail(f"{name}: `bnwatch {' '.join(command)}` is not a bnwatch command line")
    assert default[0] == "serve" and option(default, "--host") == "0.0.0.0"
    assert commands["migrate"][:2] == ["db", "upgrade"]
    assert option(commands["demo"], "--store") == f"http://api:{option(commands['api'], '--port')}"
