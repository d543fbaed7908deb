"""TLS, mTLS and bearer token, with certificates generated here (``cryptography``)."""

from __future__ import annotations

import logging
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from pydantic import SecretStr

from ncserve.v1 import ncserve_pb2 as pb
from ncserve.v1 import ncserve_pb2_grpc as pb_grpc
from tests.service_support import Pki, make_pki, start_test_server

TOKEN = "token-that-must-never-be-logged"


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> tuple[Pki, dict[str, Path]]:
    material = make_pki()
    return material, material.write(tmp_path_factory.mktemp("pki"))


def _list_runs(channel: grpc.Channel, metadata=()) -> pb.ListRunsReply:
    return pb_grpc.NCServiceStub(channel).ListRuns(
        pb.ListRunsRequest(), metadata=metadata, timeout=5
    )


def _code(channel: grpc.Channel, metadata=()) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        _list_runs(channel, metadata)
    return info.value.code()


def test_tls(tmp_path, pki) -> None:
    material, paths = pki
    handle = start_test_server(
        tmp_path / "nc.db", tls_cert=paths["server_cert"], tls_key=paths["server_key"]
    )
    target = f"127.0.0.1:{handle.port}"
    try:
        trusted = grpc.ssl_channel_credentials(root_certificates=material.ca_cert)
        with grpc.secure_channel(target, trusted) as channel:
            assert _list_runs(channel).runs == []
        # Plaintext against a TLS port, or a client that trusts another CA, never connects.
        with grpc.insecure_channel(target) as channel:
            assert _code(channel) == grpc.StatusCode.UNAVAILABLE
        stranger = grpc.ssl_channel_credentials(root_certificates=material.other_ca_cert)
        with grpc.secure_channel(target, stranger) as channel:
            assert _code(channel) == grpc.StatusCode.UNAVAILABLE
    finally:
        handle.stop(0.5)


def test_mutual_tls(tmp_path, pki) -> None:
    material, paths = pki
    handle = start_test_server(
        tmp_path / "nc.db",
        tls_cert=paths["server_cert"],
        tls_key=paths["server_key"],
        client_ca=paths["ca_cert"],
    )
    target = f"127.0.0.1:{handle.port}"
    try:
        ours = grpc.ssl_channel_credentials(
            root_certificates=material.ca_cert,
            private_key=material.client_key,
            certificate_chain=material.client_cert,
        )
        with grpc.secure_channel(target, ours) as channel:
            assert _list_runs(channel).runs == []
        anonymous = grpc.ssl_channel_credentials(root_certificates=material.ca_cert)
        with grpc.secure_channel(target, anonymous) as channel:
            assert _code(channel) == grpc.StatusCode.UNAVAILABLE
        foreign = grpc.ssl_channel_credentials(
            root_certificates=material.ca_cert,
            private_key=material.other_client_key,
            certificate_chain=material.other_client_cert,
        )
        with grpc.secure_channel(target, foreign) as channel:
            assert _code(channel) == grpc.StatusCode.UNAVAILABLE
    finally:
        handle.stop(0.5)


def test_token_on_every_rpc_except_health(tmp_path, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    handle = start_test_server(tmp_path / "nc.db", token=SecretStr(TOKEN))
    good = (("authorization", f"Bearer {TOKEN}"),)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{handle.port}") as channel:
            assert _list_runs(channel, good).runs == []
            unauthenticated = grpc.StatusCode.UNAUTHENTICATED
            assert _code(channel) == unauthenticated
            assert _code(channel, (("authorization", "Bearer wrong"),)) == unauthenticated
            assert _code(channel, (("authorization", TOKEN),)) == unauthenticated  # no scheme
            assert _code(channel, (*good, ("authorization", "Bearer x"))) == unauthenticated
            # Streaming RPCs are guarded too.
            stub = pb_grpc.NCServiceStub(channel)
            with pytest.raises(grpc.RpcError) as info:
                list(stub.WatchMetrics(pb.WatchMetricsRequest(run_id="r"), timeout=5))
            assert info.value.code() == unauthenticated
            with pytest.raises(grpc.RpcError) as info:
                stub.PushRound1(iter([pb.ShardChunk()]), timeout=5)
            assert info.value.code() == unauthenticated
            reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
            with pytest.raises(grpc.RpcError) as info:
                request = reflection_pb2.ServerReflectionRequest(list_services="")
                next(reflect.ServerReflectionInfo(iter([request]), timeout=5))
            assert info.value.code() == unauthenticated
            # Health checking needs no token (load balancers and kubelets do not have it).
            health = health_pb2_grpc.HealthStub(channel)
            answer = health.Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
        rejected = handle.metrics.registry.get_sample_value(
            "ncserve_shards_rejected_total", {"reason": "unauthenticated"}
        )
        assert rejected == 1  # the one push; queries are not shards
    finally:
        handle.stop(0.5)
    assert TOKEN not in caplog.text


def test_token_over_tls_as_call_credentials(tmp_path, pki) -> None:
    material, paths = pki
    handle = start_test_server(
        tmp_path / "nc.db",
        tls_cert=paths["server_cert"],
        tls_key=paths["server_key"],
        token=SecretStr(TOKEN),
    )
    target = f"127.0.0.1:{handle.port}"
    try:
        tls = grpc.ssl_channel_credentials(root_certificates=material.ca_cert)
        # gRPC's own access-token credentials send exactly 'authorization: Bearer <token>'.
        both = grpc.composite_channel_credentials(tls, grpc.access_token_call_credentials(TOKEN))
        with grpc.secure_channel(target, both) as channel:
            assert _list_runs(channel).runs == []
        with grpc.secure_channel(target, tls) as channel:
            assert _code(channel) == grpc.StatusCode.UNAUTHENTICATED
    finally:
        handle.stop(0.5)


def test_config_refuses_half_a_tls_setup(tmp_path, pki) -> None:
    from pydantic import ValidationError

    from ncserve.service import ServerConfig

    _, paths = pki
    with pytest.raises(ValidationError, match="tls_cert and tls_key go together"):
        ServerConfig(db_path=tmp_path / "x.db", tls_cert=paths["server_cert"])
    with pytest.raises(ValidationError, match="client_ca"):
        ServerConfig(db_path=tmp_path / "x.db", client_ca=paths["ca_cert"])
    with pytest.raises(ValidationError, match="token is empty"):
        ServerConfig(db_path=tmp_path / "x.db", token=SecretStr("  "))
    assert TOKEN not in repr(ServerConfig(db_path=tmp_path / "x.db", token=SecretStr(TOKEN)))
