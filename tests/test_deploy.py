"""docs/deploy/: the systemd units, the Dockerfile and the Kubernetes example say what works.

Each file is parsed (the units as systemd reads them, the YAML with PyYAML, the
Dockerfile's instructions) and its wiring checked: names that must agree, ports
that must match, the stop bounds, the unprivileged users.  Flags of `gaspar
serve` are parsed by the command's own parser, so a flag it lacks fails here.
The claim that gaspar needs no writable file system is tested for real, with a
read-only root in a mount namespace of the test's own.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from gaspar.cli import build_parser
from gaspar.client import request

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "docs" / "deploy"
# Seconds the producer gives its workers to leave once the requests are done (the
# supervisor's SIGTERM-then-SIGKILL: Producer._teardown), on top of --grace and
# --write-timeout, in the worst case of a stop.
WORKERS_LEAVE = 5.0


# -- parsing -------------------------------------------------------------------------


def read_unit(path: Path) -> dict[str, list[tuple[str, str]]]:
    """A unit file as systemd reads it: sections of (key, value), repeats kept, in order."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    pending = ""
    for raw in path.read_text().splitlines():
        line = pending + raw.strip()
        pending = ""
        if not line or line[0] in "#;":
            continue
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        assert current is not None, f"{path.name}: {line!r} before any section"
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: not KEY=VALUE: {line!r}"
        current.append((key.strip(), value.strip()))
    return sections


def values(unit: dict[str, list[tuple[str, str]]], section: str, key: str) -> list[str]:
    return [v for k, v in unit.get(section, []) if k == key]


def value(unit: dict[str, list[tuple[str, str]]], section: str, key: str) -> str:
    """The value systemd uses for a key that takes one: the last assignment."""
    found = values(unit, section, key)
    assert found, f"no {key}= in [{section}]"
    return found[-1]


def seconds(text: str) -> float:
    """A systemd time span of the forms used here: `60`, `60s`, `1min`, `1min 30s`."""
    units = {"": 1.0, "s": 1.0, "sec": 1.0, "min": 60.0, "m": 60.0}
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", text)
    assert parts, f"not a time span: {text!r}"
    return sum(float(n) * units[u] for n, u in parts)


def dockerfile(path: Path) -> list[tuple[str, str]]:
    """The instructions of a Dockerfile: (INSTRUCTION, arguments), continuations joined."""
    found, pending = [], ""
    for raw in path.read_text().splitlines():
        if not pending and raw.lstrip().startswith("#"):
            continue
        if raw.endswith("\\"):
            pending += raw[:-1] + " "
            continue
        line, pending = (pending + raw).strip(), ""
        if line:
            word, _, rest = line.partition(" ")
            found.append((word.upper(), rest.strip()))
    return found


def exec_form(arguments: str) -> list[str]:
    """A CMD or ENTRYPOINT in exec (JSON) form: its argv."""
    argv = json.loads(arguments)
    assert isinstance(argv, list), arguments
    return [str(a) for a in argv]


def stop_bound(grace: float, write_timeout: float) -> float:
    """The longest a graceful stop of `gaspar serve` takes: what a stop timeout must exceed."""
    return grace + write_timeout + WORKERS_LEAVE


def flags(args: list[str]) -> dict[str, str]:
    """`--name=value` and `--name value` arguments, by name."""
    found: dict[str, str] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("--"):
            name, sep, text = arg[2:].partition("=")
            if not sep and i + 1 < len(args) and not args[i + 1].startswith("--"):
                i += 1
                text = args[i]
            found[name] = text
        i += 1
    return found


def free_port_of(argv: list[str]) -> int:
    return int(flags(argv)["port"])


# -- systemd ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def service() -> dict[str, list[tuple[str, str]]]:
    return read_unit(DEPLOY / "gaspar.service")


@pytest.fixture(scope="module")
def socket_unit() -> dict[str, list[tuple[str, str]]]:
    return read_unit(DEPLOY / "gaspar.socket")


def test_service_is_notify_type_with_mixed_kill_mode(service: Any) -> None:
    assert value(service, "Service", "Type") == "notify"
    assert value(service, "Service", "NotifyAccess") == "main"
    # SIGTERM to the producer only; what is left at its exit is SIGKILLed.
    assert value(service, "Service", "KillMode") == "mixed"
    assert value(service, "Service", "KillSignal") in ("SIGTERM", "TERM")
    assert int(value(service, "Service", "LimitNOFILE")) > 1024


def test_service_runs_gaspar_serve_with_flags_it_has(service: Any) -> None:
    argv = shlex.split(value(service, "Service", "ExecStart"))
    assert Path(argv[0]).name == "gaspar" and argv[1] == "serve"
    args = build_parser().parse_args(argv[1:])  # exits (SystemExit) on an unknown flag
    # The port is the socket unit's: no --host or --port, which would only be logged.
    assert not {"--host", "--port"} & {a.split("=")[0] for a in argv}
    stop = seconds(value(service, "Service", "TimeoutStopSec"))
    assert stop > stop_bound(args.grace, args.write_timeout), "systemd would SIGKILL a stop"


def test_socket_unit_passes_one_listening_socket_to_the_service(
    service: Any, socket_unit: Any
) -> None:
    (listen,) = values(socket_unit, "Socket", "ListenStream")  # gaspar serves on one
    assert re.fullmatch(r"(\S+:)?\d+", listen)
    assert value(socket_unit, "Socket", "Accept") in ("no", "false")
    # gaspar.socket activates gaspar.service: same name, and the service requires it.
    assert "gaspar.socket" in value(service, "Unit", "Requires").split()
    assert "gaspar.socket" in value(service, "Unit", "After").split()
    assert values(socket_unit, "Install", "WantedBy") == ["sockets.target"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_systemd_analyze_verify_finds_nothing(tmp_path: Path) -> None:
    """systemd's own check, with ExecStart and WorkingDirectory pointing at what exists here."""
    text = (DEPLOY / "gaspar.service").read_text()
    gaspar = Path(sys.executable).with_name("gaspar")
    text = re.sub(r"(?m)^ExecStart=\S+", f"ExecStart={gaspar}", text)
    text = re.sub(r"(?m)^WorkingDirectory=.*$", f"WorkingDirectory={tmp_path}", text)
    (tmp_path / "gaspar.service").write_text(text)
    shutil.copy(DEPLOY / "gaspar.socket", tmp_path / "gaspar.socket")
    out = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", "gaspar.socket", "gaspar.service"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0 and out.stderr == "", out.stderr


# -- Docker -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def image() -> list[tuple[str, str]]:
    return dockerfile(DEPLOY / "Dockerfile")


def last(instructions: list[tuple[str, str]], word: str) -> str:
    found = [args for w, args in instructions if w == word]
    assert found, f"no {word}"
    return found[-1]


def test_image_runs_as_an_unprivileged_numeric_user(image: list[tuple[str, str]]) -> None:
    stage = image[max(i for i, (w, _) in enumerate(image) if w == "FROM") :]
    user = last(stage, "USER")
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) != 0, f"USER {user}: not a numeric, unprivileged user"
    assert not gid or (gid.isdigit() and int(gid) != 0)
    # Nothing runs as root after the switch.
    after = stage[max(i for i, (w, _) in enumerate(stage) if w == "USER") :]
    assert not [a for w, a in after if w == "RUN"]


def test_image_serves_on_the_port_it_exposes_and_checks(image: list[tuple[str, str]]) -> None:
    assert exec_form(last(image, "ENTRYPOINT")) == ["gaspar"]
    argv = exec_form(last(image, "CMD"))
    args = build_parser().parse_args(argv)
    assert args.command == "serve" and args.host == "0.0.0.0"
    assert str(args.port) in last(image, "EXPOSE").split()
    health = last(image, "HEALTHCHECK")
    assert f"('127.0.0.1', {args.port})" in health and "ff475302" in health
    # The handler named is what the image copies to /app.
    module, _, attr = args.target.partition(":")
    assert "COPY examples /app" in [f"{w} {a}" for w, a in image]
    assert f"def {attr}(" in (ROOT / "examples" / f"{module}.py").read_text()


def test_docker_run_line_is_read_only_and_waits_for_the_stop(image: list[tuple[str, str]]) -> None:
    args = build_parser().parse_args(exec_form(last(image, "CMD")))
    for where in (DEPLOY / "Dockerfile", DEPLOY / "README.md"):
        text = where.read_text().replace("\\\n", " ").replace("#", " ")
        runs = re.findall(r"docker run [^\n`]*", text)
        assert runs, f"no docker run line in {where.name}"
        for run in runs:
            words = run.split()
            assert "--read-only" in words and "--init" in words, run
            (timeout,) = re.findall(r"--stop-timeout[ =](\d+)", run)
            assert int(timeout) > stop_bound(args.grace, args.write_timeout), run


# -- Kubernetes ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def manifests() -> list[dict[str, Any]]:
    with open(DEPLOY / "kubernetes.yaml") as f:
        return [doc for doc in yaml.safe_load_all(f) if doc]


def of_kind(manifests: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {m["metadata"]["name"]: m for m in manifests if m["kind"] == kind}


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    (only,) = deployment["spec"]["template"]["spec"]["containers"]
    return dict(only)


def secrets_made() -> dict[str, set[str]]:
    """The Secrets that kubernetes.yaml's `kubectl create secret` lines make: name -> files."""
    made: dict[str, set[str]] = {}
    for line in (DEPLOY / "kubernetes.yaml").read_text().splitlines():
        match = re.match(r"#\s+kubectl create secret generic (\S+) (.*)", line)
        if match:
            files = re.findall(r"--from-file=(\S+)", match.group(2))
            made[match.group(1)] = {Path(f).name for f in files}
    return made


def keys_made() -> set[str]:
    """The key files that the `gaspar keygen` lines of kubernetes.yaml write."""
    names = re.findall(
        r"#\s+gaspar keygen (\S+) --name (\S+)", (DEPLOY / "kubernetes.yaml").read_text()
    )
    return {f"{name}{suffix}" for _, name in names for suffix in (".key", ".key_secret")}


def mounted_files(deployment: dict[str, Any]) -> dict[str, set[str]]:
    """Directory -> the files a Secret puts there, for each secret volume mounted."""
    made = secrets_made()
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    found = {}
    for mount in container(deployment)["volumeMounts"]:
        secret = volumes[mount["name"]]["secret"]
        assert secret["secretName"] in made, f"{secret['secretName']}: no kubectl line makes it"
        assert secret["defaultMode"] & 0o007 == 0, "secret files readable by any user"
        assert mount.get("readOnly") is True
        found[mount["mountPath"]] = made[secret["secretName"]]
    return found


def selects(service: dict[str, Any], deployment: dict[str, Any]) -> bool:
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    return all(labels.get(k) == v for k, v in service["spec"]["selector"].items())


def container_port(deployment: dict[str, Any], port: int | str) -> int:
    """The number of a container port given by name or number; it must be declared."""
    declared = {p["name"]: p["containerPort"] for p in container(deployment)["ports"]}
    if isinstance(port, str):
        assert port in declared, f"port {port!r} is not declared"
        return int(declared[port])
    assert port in declared.values(), f"port {port} is not declared"
    return port


def test_every_document_is_a_known_kind(manifests: list[dict[str, Any]]) -> None:
    kinds = sorted(m["kind"] for m in manifests)
    assert kinds == ["Deployment", "Deployment", "Service", "Service"]
    for m in manifests:
        assert m["apiVersion"] == {"Service": "v1", "Deployment": "apps/v1"}[m["kind"]]


def test_deployments_select_their_own_pods(manifests: list[dict[str, Any]]) -> None:
    for name, deployment in of_kind(manifests, "Deployment").items():
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        for key, label in deployment["spec"]["selector"]["matchLabels"].items():
            assert labels.get(key) == label, f"{name}: selector does not match its pods"


def test_services_reach_the_producer_ports(manifests: list[dict[str, Any]]) -> None:
    producer = of_kind(manifests, "Deployment")["gaspar-producer"]
    argv = container(producer)["args"]
    assert argv[0] == "serve"
    options = flags(argv)
    client = free_port_of(argv)
    bind = re.fullmatch(r"tcp://([^:]+):(\d+)", options["worker-bind"])
    assert bind, options["worker-bind"]
    reached = set()
    for name, service in of_kind(manifests, "Service").items():
        assert selects(service, producer), f"Service {name} selects no producer"
        for port in service["spec"]["ports"]:
            reached.add(container_port(producer, port["targetPort"]))
    assert reached == {client, int(bind.group(2))}
    # The clients' Service selects every pool's producer; the workers', this pool's only.
    pools = {"gaspar.pool"} & set(
        of_kind(manifests, "Service")["gaspar-producer"]["spec"]["selector"]
    )
    assert (
        pools and "gaspar.pool" not in of_kind(manifests, "Service")["gaspar"]["spec"]["selector"]
    )
    assert producer["spec"]["replicas"] == 1  # one producer per pool


def test_workers_connect_to_the_producer_service_and_its_port(
    manifests: list[dict[str, Any]],
) -> None:
    workers = of_kind(manifests, "Deployment")["gaspar-workers"]
    services = of_kind(manifests, "Service")
    argv = container(workers)["args"]
    assert argv[0] == "worker"
    endpoint = re.fullmatch(r"tcp://([^:]+):(\d+)", argv[1])
    assert endpoint, argv[1]
    service = services[endpoint.group(1)]
    ports = {p["port"]: p for p in service["spec"]["ports"]}
    assert int(endpoint.group(2)) in ports
    # ... which is the port the producer binds for workers, and the handler is the producer's.
    producer = of_kind(manifests, "Deployment")["gaspar-producer"]
    target = ports[int(endpoint.group(2))]["targetPort"]
    bind = flags(container(producer)["args"])["worker-bind"]
    assert bind.endswith(f":{container_port(producer, target)}")
    assert argv[2] == container(producer)["args"][1]
    assert flags(argv)["processes"] == "1"  # so that replicas is the pool size


def test_mounted_secrets_hold_the_keys_each_side_names(manifests: list[dict[str, Any]]) -> None:
    made = keys_made()
    deployments = of_kind(manifests, "Deployment")
    for name, want in (
        ("gaspar-producer", {"key": "file", "allow": "directory"}),
        ("gaspar-workers", {"key": "file", "server-key": "file"}),
    ):
        mounts = mounted_files(deployments[name])
        options = flags(container(deployments[name])["args"])
        for flag, kind in want.items():
            path = Path(options[flag])
            if kind == "directory":
                files = mounts[str(path)]
                assert files and all(f.endswith(".key") for f in files), files  # public only
            else:
                assert path.name in mounts[str(path.parent)], f"{name}: --{flag}={path} missing"
            assert mounts[str(path if kind == "directory" else path.parent)] <= made
    producer, worker = (flags(container(deployments[n])["args"]) for n in deployments)
    # Each side's secret is its own; each side has the other's public key.
    assert Path(producer["key"]).name == "producer.key_secret"
    assert Path(worker["key"]).name == "worker.key_secret"
    assert Path(worker["server-key"]).name == "producer.key"


def test_probes_target_declared_ports(manifests: list[dict[str, Any]]) -> None:
    producer = of_kind(manifests, "Deployment")["gaspar-producer"]
    spec = container(producer)
    client = free_port_of(spec["args"])
    assert container_port(producer, spec["readinessProbe"]["tcpSocket"]["port"]) == client
    command = " ".join(spec["livenessProbe"]["exec"]["command"])
    assert f"('127.0.0.1', {client})" in command and "ff475302" in command
    # The same check as the image's HEALTHCHECK.
    assert command.split(" ", 2)[2] in last(dockerfile(DEPLOY / "Dockerfile"), "HEALTHCHECK")


def test_pods_run_unprivileged_on_a_read_only_root(manifests: list[dict[str, Any]]) -> None:
    uid = last(dockerfile(DEPLOY / "Dockerfile"), "USER").partition(":")[0]
    for name, deployment in of_kind(manifests, "Deployment").items():
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == int(uid), f"{name}: not the image's user"
        spec = container(deployment)
        context = spec["securityContext"]
        assert context["readOnlyRootFilesystem"] is True
        assert context["allowPrivilegeEscalation"] is False
        assert context["capabilities"]["drop"] == ["ALL"]
        assert spec["resources"]["requests"]["cpu"] and spec["resources"]["requests"]["memory"]


def test_termination_grace_outlasts_a_graceful_stop(manifests: list[dict[str, Any]]) -> None:
    defaults = build_parser().parse_args(["serve", "x:y"])
    for name, deployment in of_kind(manifests, "Deployment").items():
        spec = container(deployment)
        grace = float(flags(spec["args"])["grace"])
        pre_stop = spec.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command")
        waited = float(pre_stop[1]) if pre_stop and pre_stop[0] == "sleep" else 0.0
        total = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        if name == "gaspar-producer":
            assert total > waited + stop_bound(grace, defaults.write_timeout), name
        else:
            assert total > grace, name


def test_kubernetes_commands_parse_when_the_command_has_them(
    manifests: list[dict[str, Any]],
) -> None:
    """Once `gaspar worker` and the remote-worker flags exist, the example's argv must parse."""
    parser = build_parser()
    choices = re.search(r"\{([^}]*)\}", parser.format_usage())
    assert choices, parser.format_usage()
    if "worker" not in choices.group(1).split(","):
        pytest.skip("this gaspar has no `gaspar worker` yet (issue 11)")
    for deployment in of_kind(manifests, "Deployment").values():
        parser.parse_args(container(deployment)["args"])


# -- nothing written ----------------------------------------------------------------


@pytest.mark.skipif(
    os.geteuid() != 0 or not (shutil.which("unshare") and shutil.which("setpriv")),
    reason="needs root, unshare and setpriv to make a read-only root in a mount namespace",
)
def test_serve_needs_no_writable_file_system() -> None:
    """`gaspar serve` as an unprivileged user, every file read-only: it serves and stops."""
    probe = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
        + [sys.executable, "-c", "import gaspar"],
        cwd=ROOT,
        capture_output=True,
        timeout=30,
    )
    if probe.returncode != 0:  # e.g. an interpreter under /root, which uid 65534 cannot read
        reason = probe.stderr.decode(errors="replace").strip().splitlines()[-1:]
        pytest.skip(f"uid 65534 cannot run {sys.executable}: {' '.join(reason)}")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    address = f"@gaspar-test-{uuid.uuid4().hex}"  # abstract: no file to write or to reach
    notify.bind("\0" + address[1:])
    notify.settimeout(30)
    script = (
        'mount -o remount,bind,ro / && exec setpriv --reuid=65534 --regid=65534 --clear-groups "$@"'
    )
    command = [sys.executable, "-m", "gaspar", "serve", "tests.handlers:echo", "--port", "0"]
    proc = subprocess.Popen(
        ["unshare", "--mount", "sh", "-c", script, "sh", *command, "--workers", "2"],
        cwd=ROOT,
        env={**os.environ, "NOTIFY_SOCKET": address},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        try:
            ready = dict(line.split("=", 1) for line in notify.recv(4096).decode().splitlines())
        except TimeoutError:
            proc.kill()
            pytest.fail(f"not ready: {proc.communicate(timeout=10)[1].decode()}")
        port = int(ready["STATUS"].split()[2].rsplit(":", 1)[1])
        assert request(("127.0.0.1", port), b"read-only", timeout=10) == b"read-only"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err.decode()
        assert b"Read-only file system" not in err and b"Permission denied" not in err
    finally:
        notify.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
