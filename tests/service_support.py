"""Helpers shared by the service tests and the ingest benchmark: data, pushes, certificates."""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np

from ncserve import wire
from ncserve.metrics import ClassMeans, Round1Stats, round1_stats, round2_stats
from ncserve.v1 import ncserve_pb2 as pb
from ncserve.v1 import ncserve_pb2_grpc as pb_grpc


@dataclass(frozen=True)
class Dataset:
    """Features of one measurement split, sharded over ranks, and the classifier."""

    shards: list[tuple[np.ndarray, np.ndarray]]  # (h_NP, y_N) per rank
    weight_KP: np.ndarray
    bias_K: np.ndarray

    @property
    def num_classes(self) -> int:
        return int(self.weight_KP.shape[0])

    @property
    def feature_dim(self) -> int:
        return int(self.weight_KP.shape[1])

    def union(self) -> tuple[np.ndarray, np.ndarray]:
        return (
            np.concatenate([h for h, _ in self.shards]),
            np.concatenate([y for _, y in self.shards]),
        )


def make_dataset(
    seed: int, num_classes: int, feature_dim: int, world_size: int, per_rank: int
) -> Dataset:
    """Clustered features; every rank holds every class so round 1 never lacks one."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(num_classes, feature_dim)) * 3
    shards = []
    for _ in range(world_size):
        y = np.concatenate(
            [np.arange(num_classes), rng.integers(0, num_classes, per_rank - num_classes)]
        )
        h = centers[y] + rng.normal(size=(per_rank, feature_dim))
        shards.append((h, y))
    weight = centers + 0.1 * rng.normal(size=centers.shape)
    bias = 0.01 * rng.normal(size=num_classes)
    return Dataset(shards, weight, bias)


def header(
    run_id: str, step: int, rank: int, round_: int, num_classes: int, feature_dim: int, **extra
) -> pb.ShardHeader:
    return pb.ShardHeader(
        run_id=run_id,
        step=step,
        rank=rank,
        round=round_,
        num_classes=num_classes,
        feature_dim=feature_dim,
        **extra,
    )


def encoded_push(
    hdr: pb.ShardHeader, chunks: Sequence[pb.TensorChunk], payload_bytes: int
) -> Iterator[pb.ShardChunk]:
    """A push of chunks encoded beforehand, as ncserve.client sends it: the header declares
    the payload size (``wire.payload_nbytes`` of the arrays the chunks carry)."""
    declared = pb.ShardHeader()
    declared.CopyFrom(hdr)
    declared.payload_bytes = payload_bytes
    yield pb.ShardChunk(header=declared)
    for chunk in chunks:
        yield pb.ShardChunk(chunk=chunk)


def push_messages(hdr: pb.ShardHeader, arrays: Mapping[str, np.ndarray]) -> Iterator[pb.ShardChunk]:
    yield pb.ShardChunk(header=hdr)
    for chunk in wire.encode_arrays(arrays):
        yield pb.ShardChunk(chunk=chunk)


def round1_arrays(
    data: Dataset, rank: int, with_classifier: bool | None = None
) -> dict[str, np.ndarray]:
    h, y = data.shards[rank]
    arrays = round1_stats(h, y, data.num_classes).to_arrays()
    if rank == 0 if with_classifier is None else with_classifier:
        arrays = {**arrays, "weight": data.weight_KP, "bias": data.bias_K}
    return arrays


def round2_arrays(data: Dataset, rank: int, means: ClassMeans) -> dict[str, np.ndarray]:
    h, y = data.shards[rank]
    return round2_stats(h, y, means, data.weight_KP, data.bias_K).to_arrays()


def fetch_means(
    stub: pb_grpc.NCServiceStub,
    run_id: str,
    step: int,
    rank: int,
    num_classes: int,
    feature_dim: int,
    timeout: float = 10.0,
    metadata: Sequence[tuple[str, str]] = (),
) -> ClassMeans:
    chunks = stub.FetchClassMeans(
        pb.ClassMeansRequest(run_id=run_id, step=step, rank=rank),
        timeout=timeout,
        metadata=metadata,
    )
    return ClassMeans.from_arrays(wire.decode_arrays(chunks), num_classes, feature_dim)


def register(
    stub: pb_grpc.NCServiceStub,
    run_id: str,
    data: Dataset,
    world_size: int | None = None,
    metadata: Mapping[str, str] | None = None,
    rpc_metadata: Sequence[tuple[str, str]] = (),
) -> pb.RegisterRunReply:
    return stub.RegisterRun(
        pb.RegisterRunRequest(
            run_id=run_id,
            num_classes=data.num_classes,
            feature_dim=data.feature_dim,
            world_size=len(data.shards) if world_size is None else world_size,
            metadata=dict(metadata or {"optimizer": "sgd", "model": "mlp"}),
        ),
        metadata=rpc_metadata,
        timeout=10,
    )


def push_round1(
    stub: pb_grpc.NCServiceStub, run_id: str, step: int, data: Dataset, rank: int, **kw
) -> pb.PushReply:
    hdr = header(run_id, step, rank, pb.ROUND_1, data.num_classes, data.feature_dim)
    return stub.PushRound1(push_messages(hdr, round1_arrays(data, rank)), timeout=30, **kw)


def push_round2(
    stub: pb_grpc.NCServiceStub,
    run_id: str,
    step: int,
    data: Dataset,
    rank: int,
    means: ClassMeans,
    scalars: Mapping[str, float] | None = None,
    **kw,
) -> pb.PushReply:
    hdr = header(
        run_id, step, rank, pb.ROUND_2, data.num_classes, data.feature_dim, scalars=scalars or {}
    )
    return stub.PushRound2(push_messages(hdr, round2_arrays(data, rank, means)), timeout=30, **kw)


def run_step_sequentially(
    stub: pb_grpc.NCServiceStub, run_id: str, step: int, data: Dataset
) -> pb.Measurement:
    """Both rounds from every rank, in rank order; returns the finalized measurement."""
    for rank in range(len(data.shards)):
        push_round1(stub, run_id, step, data, rank)
    means = fetch_means(stub, run_id, step, 0, data.num_classes, data.feature_dim)
    for rank in range(len(data.shards)):
        push_round2(stub, run_id, step, data, rank, means)
    reply = stub.GetMetrics(pb.GetMetricsRequest(run_id=run_id, step=step), timeout=10)
    return reply.measurements[0]


def reference_round1(data: Dataset) -> Round1Stats:
    h, y = data.union()
    return round1_stats(h, y, data.num_classes)


# -- certificates ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    ca_cert: bytes
    server_cert: bytes
    server_key: bytes
    client_cert: bytes
    client_key: bytes
    other_ca_cert: bytes
    other_client_cert: bytes
    other_client_key: bytes

    def write(self, directory: Path) -> dict[str, Path]:
        paths = {}
        for name in self.__dataclass_fields__:
            path = directory / f"{name}.pem"
            path.write_bytes(getattr(self, name))
            paths[name] = path
        return paths


def make_pki() -> Pki:
    """A CA, a server certificate for localhost/127.0.0.1 and a client certificate, plus a
    second CA with its own client (a client the server must refuse under mTLS)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def key() -> ec.EllipticCurvePrivateKey:
        return ec.generate_private_key(ec.SECP256R1())

    def pem_key(k: ec.EllipticCurvePrivateKey) -> bytes:
        return k.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def ca(cn: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        k = key()
        cert = (
            x509.CertificateBuilder()
            .subject_name(name(cn))
            .issuer_name(name(cn))
            .public_key(k.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=True,
                    crl_sign=True, encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .sign(k, hashes.SHA256())
        )  # fmt: skip
        return cert, k

    def leaf(
        issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey], cn: str, server: bool
    ) -> tuple[bytes, bytes]:
        k = key()
        builder = (
            x509.CertificateBuilder()
            .subject_name(name(cn))
            .issuer_name(issuer[0].subject)
            .public_key(k.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
        cert = builder.sign(issuer[1], hashes.SHA256())
        return cert.public_bytes(serialization.Encoding.PEM), pem_key(k)

    root = ca("ncserve test CA")
    other = ca("another CA")
    server_cert, server_key = leaf(root, "localhost", server=True)
    client_cert, client_key = leaf(root, "trainer", server=False)
    other_cert, other_key = leaf(other, "stranger", server=False)
    return Pki(
        ca_cert=root[0].public_bytes(serialization.Encoding.PEM),
        server_cert=server_cert,
        server_key=server_key,
        client_cert=client_cert,
        client_key=client_key,
        other_ca_cert=other[0].public_bytes(serialization.Encoding.PEM),
        other_client_cert=other_cert,
        other_client_key=other_key,
    )


# -- in-process servers ---------------------------------------------------------------------


def start_test_server(db_path: Path, **overrides):  # -> ServerHandle
    """A server on an OS-picked loopback port with small limits, for one test."""
    from ncserve.service import ServerConfig, start_server

    settings = {
        "listen": "127.0.0.1:0",
        "metrics_port": 0,
        "db_path": db_path,
        "max_workers": 48,
        "grace_s": 0.5,
        **overrides,
    }
    return start_server(ServerConfig(**settings))


def insecure_stub(port: int) -> tuple[grpc.Channel, pb_grpc.NCServiceStub]:
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    return channel, pb_grpc.NCServiceStub(channel)


def table_digest(db_path: Path) -> str:
    """Digest of every row of every table: equal digests mean nothing stored changed."""
    import hashlib
    import sqlite3

    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        digest = hashlib.sha256()
        tables = [
            r[0]
            for r in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name"
            )
        ]
        for table in tables:
            digest.update(table.encode())
            for row in sorted(repr(r) for r in conn.execute(f"SELECT * FROM {table}")):
                digest.update(row.encode())
        return digest.hexdigest()
    finally:
        conn.close()


def metrics_dict(message: pb.NCMetrics) -> dict[str, float]:
    return {f.name: getattr(message, f.name) for f in message.DESCRIPTOR.fields}


def assert_metrics_close(message: pb.NCMetrics, reference: Mapping[str, float], rel: float) -> None:
    got = metrics_dict(message)
    for key, want in reference.items():
        tolerance = rel * max(1.0, abs(want))
        assert abs(got[key] - want) <= tolerance, f"{key}: service {got[key]} vs reference {want}"
