"""The heartbeat's SQS client reaches the broker's endpoint with the broker's credentials."""

from __future__ import annotations

import types
from typing import Any

import pytest
from celery import Celery

from celery_sqs_heartbeat._client import (
    MAX_CALL_TIMEOUT,
    MIN_CALL_TIMEOUT,
    BrokerInfo,
    Clients,
    call_timeout,
)
from celery_sqs_heartbeat.testing import SQSServer

pytestmark = pytest.mark.timeout(60)


def broker(url: str, **transport_options: Any) -> BrokerInfo:
    app = Celery("client", broker=url, set_as_current=False)
    app.conf.broker_transport_options = transport_options
    info = BrokerInfo.from_app(app)
    assert info is not None
    return info


def test_endpoint_and_credentials_come_from_the_broker_url() -> None:
    info = broker("sqs://AKIA:se%2Fcret@localhost:4566")
    assert info.endpoint_url == "http://localhost:4566"
    assert (info.userid, info.password) == ("AKIA", "se/cret")
    assert broker("sqs://").endpoint_url is None  # real AWS: boto3 picks the endpoint
    assert broker("sqs://host:443", is_secure=True).endpoint_url == "https://host:443"


def test_region_from_transport_options_or_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_DEFAULT_REGION", "ap-south-1")
    assert broker("sqs://", region="eu-west-3").region() == "eu-west-3"
    assert broker("sqs://").region() == "ap-south-1"


def test_not_sqs() -> None:
    assert BrokerInfo.from_app(Celery("x", broker="memory://", set_as_current=False)) is None


def test_call_timeout_is_bounded() -> None:
    assert call_timeout(30) == MAX_CALL_TIMEOUT
    assert call_timeout(0.1) == MIN_CALL_TIMEOUT
    assert call_timeout(4) == 2


def test_client_settings_and_predefined_queue_keys() -> None:
    info = broker(
        "sqs://AKIA:secret@127.0.0.1:9",
        region="eu-central-1",
        **{"client-config": {"max_pool_connections": 3, "read_timeout": 60}},
        predefined_queues={
            "special": {
                "url": "http://127.0.0.1:9/1/special",
                "access_key_id": "QK",
                "secret_access_key": "QS",
                "region": "us-west-2",
            },
        },
    )
    clients = Clients(info, timeout=2.0)
    default = clients.for_queue("http://127.0.0.1:9/1/other")
    special = clients.for_queue("http://127.0.0.1:9/1/special")
    assert clients.for_queue("http://127.0.0.1:9/1/another") is default
    assert default.meta.region_name == "eu-central-1"
    assert default.meta.endpoint_url == "http://127.0.0.1:9"
    assert default._request_signer._credentials.access_key == "AKIA"
    assert special.meta.region_name == "us-west-2"
    assert special._request_signer._credentials.access_key == "QK"
    config = default.meta.config
    assert config.max_pool_connections == 3  # the user's client-config is kept...
    assert config.read_timeout == 2.0  # ...but the heartbeat's time-outs win
    assert config.retries["total_max_attempts"] == 1


def test_sts_role_is_assumed(monkeypatch: pytest.MonkeyPatch) -> None:
    with SQSServer() as server:
        monkeypatch.setenv("AWS_ENDPOINT_URL_STS", server.endpoint_url)
        for key, value in server.worker_env().items():
            monkeypatch.setenv(key, value)
        info = broker(server.broker_url, sts_role_arn="arn:aws:iam::123456789012:role/celery")
        client = Clients(info, timeout=2.0).for_queue("")
        creds = client._request_signer._credentials
        assert creds.method == "sts-assume-role"
        assert creds.get_frozen_credentials().token
        url = client.create_queue(QueueName="sts-check")["QueueUrl"]
        assert url.endswith("/sts-check")


def test_clients_share_the_data_loader_of_kombus_own_client() -> None:
    """The worker's SQS client (kombu's) already parsed the service models: ours reuse
    them instead of loading ~10 MB again; anything unexpected means our own loader."""
    import boto3

    from celery_sqs_heartbeat._celery import kombu_loader

    theirs = boto3.client(
        "sqs", region_name="us-east-1", aws_access_key_id="k", aws_secret_access_key="s"
    )
    consumer = types.SimpleNamespace(
        connection=types.SimpleNamespace(default_channel=types.SimpleNamespace(_sqs=theirs))
    )
    loader = kombu_loader(consumer)
    assert loader is theirs._loader
    broker = BrokerInfo("127.0.0.1", 9, "k", "s", {})
    ours = Clients(broker, timeout=1.0, loader=loader).for_queue("")
    assert ours._loader is loader
    assert kombu_loader(None) is None
    assert kombu_loader(types.SimpleNamespace(connection=None)) is None
