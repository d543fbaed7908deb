"""The Dockerfile (linted, consistent with pyproject.toml and the CLIs) and its health check.

The image cannot be built here (no Docker engine), so these tests check what can be
checked without one: hadolint, that everything the Dockerfile copies and runs exists in
the repository, that every flag the Dockerfile, the chart and the compose stack pass to
`ncserve serve` and `nclaunch` exists, and that the gRPC health check script works
against a real grpc.health.v1 server, in plaintext and over TLS.
"""

from __future__ import annotations

import datetime
import json
import re
import subprocess
import sys
import time
from concurrent import futures
from pathlib import Path
from typing import Any

import pytest
import tomllib
import yaml

from tests.test_deploy_tools import CHART, REPO, require_tool, run

DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
HEALTHCHECK = REPO / "deploy" / "docker" / "ncserve-healthcheck"
COMPOSE = REPO / "deploy" / "compose" / "compose.yaml"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined."""
    joined: list[str] = []
    current = ""
    for line in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or not stripped:
            continue
        current += (
            " " + stripped.removesuffix("\\").strip()
            if current
            else stripped.removesuffix("\\").strip()
        )
        if not stripped.endswith("\\"):
            joined.append(current)
            current = ""
    assert not current, "dangling line continuation"
    return [(text.split(None, 1)[0].upper(), text.split(None, 1)[1]) for text in joined]


def stages() -> dict[str, list[tuple[str, str]]]:
    result: dict[str, list[tuple[str, str]]] = {}
    name = ""
    for instruction, args in instructions():
        if instruction == "FROM":
            match = re.fullmatch(r"(\S+)\s+AS\s+(\S+)", args, flags=re.IGNORECASE)
            assert match, f"every stage is named: FROM {args}"
            name = match.group(2)
            result[name] = [(instruction, args)]
        else:
            result[name].append((instruction, args))
    return result


def pyproject() -> dict[str, Any]:
    return tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list), f"use the exec form: {args}"
    return value


def test_hadolint_reports_nothing() -> None:
    result = run([require_tool("hadolint"), "--no-color", str(DOCKERFILE)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == ""


def test_stages_base_image_and_user() -> None:
    all_stages = stages()
    assert list(all_stages)[-1] == "service", "the default target runs ncserve serve"
    assert {"build", "trainer", "service"} <= set(all_stages)
    # The service on a slim Python base (no CUDA, no torch); the trainer on CUDA PyTorch.
    assert re.match(r"python:3\.\d+-slim\s", all_stages["service"][0][1])
    trainer_base = all_stages["trainer"][0][1]
    assert re.match(r"pytorch/pytorch:[\d.]+-cuda[\d.]+-cudnn\d+-runtime\s", trainer_base)
    for stage in ("trainer", "service"):
        users = [a for i, a in all_stages[stage] if i == "USER"]
        assert users and users[-1].split(":")[0] not in {"0", "root"}, stage


def test_dockerfile_matches_pyproject() -> None:
    project = pyproject()["project"]
    scripts = project["scripts"]
    all_stages = stages()
    entrypoints = {
        s: exec_form(a)[0]
        for s in ("trainer", "service")
        for i, a in all_stages[s]
        if i == "ENTRYPOINT"
    }
    assert entrypoints == {"trainer": "nclaunch", "service": "ncserve"}
    assert set(entrypoints.values()) <= set(scripts)
    # The Python version check agrees with requires-python.
    args = {a.split("=", 1)[0]: a.split("=", 1)[1] for i, a in all_stages["build"] if i == "ARG"}
    assert project["requires-python"] == f">={args['PYTHON_MIN']}"
    # The package is built from this repository and installed from that wheel.
    runs = [a for i, a in all_stages["build"] if i == "RUN"]
    assert any(re.search(r"pip wheel .*--no-deps .*\s\.$", r) for r in runs), runs
    # The service installs the base package (and checks torch is not there); the trainer
    # installs it with the training extra.
    (service_install,) = [a for i, a in all_stages["service"] if i == "RUN" and "pip install" in a]
    assert "/tmp/wheels/*.whl" in service_install and "[train]" not in service_install
    assert "find_spec('torch') is not None" in service_install
    assert "ncserve --help" in service_install
    (trainer_install,) = [a for i, a in all_stages["trainer"] if i == "RUN" and "pip install" in a]
    assert '"${wheel}[train]"' in trainer_install and "nclaunch --help" in trainer_install
    # Everything the build needs is copied: pyproject, its readme, every package.
    copied = set()
    for instruction, args in all_stages["build"]:
        if instruction == "COPY":
            copied.update(p.rstrip("/") for p in args.split()[:-1] if not p.startswith("--"))
    assert {"pyproject.toml", project["readme"]} <= copied
    includes = pyproject()["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {p.name for p in REPO.iterdir() if (p / "__init__.py").exists()}
    wanted = {p for p in packages if any(re.fullmatch(i.replace("*", ".*"), p) for i in includes)}
    assert wanted and wanted <= copied, f"packages not copied: {wanted - copied}"
    for source in copied:
        if source == project["readme"] and not (REPO / source).exists():
            pytest.fail(f"{source} (pyproject's readme) is missing: the image build would fail")
        assert (REPO / source).exists(), f"COPY source {source} does not exist"


def test_dockerignore_admits_only_what_is_copied() -> None:
    lines = [
        ln.strip()
        for ln in DOCKERIGNORE.read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    assert lines[0] == "*", ".dockerignore starts by excluding everything"
    admitted = {ln[1:].rstrip("/") for ln in lines if ln.startswith("!")}
    copied = set()
    for instruction, args in instructions():
        if instruction == "COPY" and "--from=" not in args:
            copied.update(p.rstrip("/") for p in args.split()[:-1] if not p.startswith("--"))
    assert copied == admitted, f"copied {sorted(copied)} but admitted {sorted(admitted)}"
    for secret in ("**/*.db", "**/*.pem", "**/*.key"):
        assert secret in lines


def test_healthcheck_and_service_command() -> None:
    service = stages()["service"]
    (healthcheck,) = [a for i, a in service if i == "HEALTHCHECK"]
    command = exec_form(healthcheck.split("CMD", 1)[1].strip())
    assert command[0] == "ncserve-healthcheck"
    copies = [a for i, a in service if i == "COPY" and "ncserve-healthcheck" in a]
    assert copies and copies[0].split()[-1] == "/usr/local/bin/ncserve-healthcheck"
    (cmd,) = [a for i, a in service if i == "CMD"]
    serve = exec_form(cmd)
    listen_port = serve[serve.index("--listen") + 1].rsplit(":", 1)[1]
    assert command[command.index("--target") + 1] == f"127.0.0.1:{listen_port}"
    exposed = {a for i, a in service if i == "EXPOSE"}
    assert exposed == {f"{listen_port} {serve[serve.index('--metrics-port') + 1]}"}
    assert serve[serve.index("--metrics-host") + 1] == "0.0.0.0"


def test_compose_targets_exist() -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    for name, service in compose["services"].items():
        if "build" in service:
            assert (
                COMPOSE.parent / service["build"]["context"] / service["build"]["dockerfile"]
            ).resolve() == DOCKERFILE
            assert service["build"]["target"] in stages(), name


# --- the flags passed to the CLIs exist ---------------------------------------------------------


def cli_help(code: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def flags(command: list[str]) -> set[str]:
    return {a for a in command if a.startswith("--")}


def rendered(kind: str, values_file: str) -> list[dict[str, Any]]:
    result = run(
        [
            require_tool("helm"),
            "template",
            "demo",
            str(CHART),
            "-f",
            str(CHART / "ci" / values_file),
        ]
    )
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d and d["kind"] == kind]


def test_ncserve_serve_accepts_every_flag_the_deployments_pass() -> None:
    if not (REPO / "ncserve" / "cli" / "serve.py").exists():
        pytest.skip("ncserve serve is not written yet")
    help_text = cli_help(
        "import sys; sys.argv = ['ncserve', 'serve', '--help']; from ncserve.cli import main; main()"
    )
    known = set(re.findall(r"(--[a-z][a-z0-9-]*)", help_text))
    used: set[str] = set()
    (cmd,) = [a for i, a in stages()["service"] if i == "CMD"]
    used |= flags(exec_form(cmd))
    used |= flags(yaml.safe_load(COMPOSE.read_text())["services"]["ncserve"]["command"])
    for values_file in ("default-values.yaml", "tls-token-values.yaml"):
        (deployment,) = rendered("Deployment", values_file)
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        assert container["command"][:2] == ["ncserve", "serve"]
        used |= flags(container["command"])
    assert used - known == set(), f"ncserve serve has no {sorted(used - known)}"


def test_nclaunch_accepts_every_flag_the_trainers_pass() -> None:
    if not (REPO / "launcher" / "cli.py").exists():
        pytest.skip("nclaunch's CLI is not written yet")
    help_text = cli_help(
        "import sys; sys.argv = ['nclaunch', '--help']; from launcher.cli import main; main()"
    )
    known = set(re.findall(r"(--[a-z][a-z0-9_-]*)", help_text))
    used = flags(yaml.safe_load(COMPOSE.read_text())["services"]["trainer"]["command"])
    for values_file, kind in (
        ("default-values.yaml", "Job"),
        ("tls-token-values.yaml", "Job"),
        ("gpu-values.yaml", "Job"),
        ("pytorchjob-values.yaml", "PyTorchJob"),
    ):
        for doc in rendered(kind, values_file):
            templates = (
                [doc["spec"]["template"]]
                if kind == "Job"
                else [r["template"] for r in doc["spec"]["pytorchReplicaSpecs"].values()]
            )
            for template in templates:
                (container,) = template["spec"]["containers"]
                assert container["command"][0] == "nclaunch"
                used |= flags(container["command"])
                pet = {e["name"] for e in container["env"] if e["name"].startswith("PET_")}
                for name in pet:
                    assert f"PET_{name[4:]}" in help_text, f"nclaunch does not read {name}"
    assert used - known == set(), f"nclaunch has no {sorted(used - known)}"


# --- the health check script against a real grpc.health.v1 server ---------------------------------


@pytest.fixture
def health_server():
    grpc = pytest.importorskip("grpc")
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    servers = []

    def start(credentials=None):
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        servicer = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        if credentials is None:
            port = server.add_insecure_port("127.0.0.1:0")
        else:
            port = server.add_secure_port("127.0.0.1:0", credentials)
        server.start()
        servers.append(server)
        return servicer, port, health_pb2.HealthCheckResponse

    yield start
    for server in servers:
        server.stop(grace=None)


def check(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(HEALTHCHECK), "--timeout", "3", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_healthcheck_plaintext(health_server) -> None:
    servicer, port, response = health_server()
    servicer.set("", response.SERVING)
    result = check("--target", f"127.0.0.1:{port}")
    assert result.returncode == 0, result.stderr
    assert "healthy" in result.stderr and "SERVING" in result.stderr
    servicer.set("", response.NOT_SERVING)
    result = check("--target", f"127.0.0.1:{port}")
    assert result.returncode == 1 and "NOT_SERVING" in result.stderr


def test_healthcheck_fails_when_nothing_listens() -> None:
    result = check("--target", "127.0.0.1:1")  # port 1: nothing listens there
    assert result.returncode == 1 and "UNAVAILABLE" in result.stderr


def _certificates(tmp_path: Path, server_name: str) -> tuple[Path, bytes, bytes]:
    pytest.importorskip("cryptography")
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ncserve test CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, server_name)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(server_name)]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    ca_file = tmp_path / "ca.crt"
    ca_file.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return ca_file, key_pem, cert.public_bytes(serialization.Encoding.PEM)


def test_healthcheck_over_tls_with_the_service_name(health_server, tmp_path: Path) -> None:
    import grpc

    name = "demo-ncserve.ml.svc"
    ca_file, key_pem, cert_pem = _certificates(tmp_path, name)
    servicer, port, response = health_server(grpc.ssl_server_credentials([(key_pem, cert_pem)]))
    servicer.set("", response.SERVING)
    # As the chart's exec probe does: connect to localhost, verify the Service's name.
    result = check("--target", f"127.0.0.1:{port}", "--tls-ca", str(ca_file), "--server-name", name)
    assert result.returncode == 0, result.stderr
    # Without the name override the certificate does not match 127.0.0.1.
    result = check("--target", f"127.0.0.1:{port}", "--tls-ca", str(ca_file))
    assert result.returncode == 1


def test_healthcheck_against_ncserve_serve_with_a_token(tmp_path: Path) -> None:
    """The image's HEALTHCHECK and the chart's probes against the real server.

    The token guards every RPC except health, which is what lets Kubernetes' native grpc
    probes (which cannot send metadata) check a server that requires a token.
    """
    if not (REPO / "ncserve" / "cli" / "serve.py").exists():
        pytest.skip("ncserve serve is not written yet")
    token = tmp_path / "token"
    token.write_text("s3cret-token\n")
    port_file = tmp_path / "port"
    code = "import sys; from ncserve.cli import main; sys.argv[0] = 'ncserve'; main()"
    server = subprocess.Popen(
        [
            sys.executable,
            "-c",
            code,
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--port-file",
            str(port_file),
            "--db",
            str(tmp_path / "ncserve.db"),
            "--token-file",
            str(token),
            "--log-level",
            "warning",
        ],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not port_file.exists():
            assert server.poll() is None, (
                f"ncserve serve exited: {server.stderr.read() if server.stderr else ''}"
            )
            assert time.monotonic() < deadline, "ncserve serve did not start within 60 s"
            time.sleep(0.1)
        port = int(port_file.read_text())
        result = check("--target", f"127.0.0.1:{port}")
        assert result.returncode == 0, result.stderr
        assert "SERVING" in result.stderr
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
