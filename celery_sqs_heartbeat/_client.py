"""SQS clients that reach the broker's own queues, built from the worker's broker settings.

The heartbeat must talk to the same endpoint, region and account as kombu's SQS
transport, with no configuration of its own. This mirrors kombu's
``Channel.new_sqs_client`` (endpoint from the broker URL's host and port and
``is_secure``, region, the URL's credentials or the default chain, per-queue keys of
``predefined_queues``, ``sts_role_arn``, ``client-config``) without opening a channel,
which would list the account's queues.

Clients are made in the process that uses them (a boto3 client must not cross a fork),
one per set of credentials, and shared by the sidecar's calls. Where the worker's own
(kombu's) client can be found, ours are made with its botocore data loader: they share
its parsed service models and endpoint data, about 9 MB a worker would otherwise load
twice.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ._quiet import untraced

#: kombu's region when neither the transport options nor the environment name one.
DEFAULT_REGION = "us-east-1"
#: Upper bound for the client's connect and read time-outs, in seconds. A beat must
#: fail fast and be retried rather than wait through botocore's 60-second default.
MAX_CALL_TIMEOUT = 5.0
#: Lower bound for the same time-outs, so a tiny interval still allows a real round trip.
MIN_CALL_TIMEOUT = 1.0
#: Session name used when assuming ``sts_role_arn``, as kombu does.
STS_SESSION_NAME = "Celery"


@dataclass(frozen=True)
class BrokerInfo:
    """What the heartbeat needs of the broker connection; None values mean "default"."""

    hostname: str | None
    port: int | None
    userid: str | None
    password: str | None
    transport_options: Mapping[str, Any]

    @classmethod
    def from_app(cls, app: Any) -> BrokerInfo | None:
        """The SQS broker of *app*, or None when its broker is not SQS."""
        conn = app.connection_for_read()
        try:
            if getattr(conn.transport, "driver_type", None) != "sqs":
                return None
            return cls(
                hostname=conn.hostname or None,
                port=conn.port,
                userid=conn.userid,
                password=conn.password,
                transport_options=dict(conn.transport_options or {}),
            )
        finally:
            conn.release()

    @property
    def is_secure(self) -> bool:
        value = self.transport_options.get("is_secure")
        return True if value is None else bool(value)

    @property
    def endpoint_url(self) -> str | None:
        # kombu: https only when is_secure is set true; plain http otherwise.
        if self.hostname is None:
            return None
        scheme = "https" if self.transport_options.get("is_secure") else "http"
        port = f":{self.port}" if self.port is not None else ""
        return f"{scheme}://{self.hostname}{port}"

    def region(self) -> str:
        import boto3

        return str(
            self.transport_options.get("region") or boto3.Session().region_name or DEFAULT_REGION
        )

    def predefined_queue(self, queue_url: str) -> Mapping[str, Any] | None:
        """The ``predefined_queues`` entry whose URL is *queue_url*, if any."""
        for q in (self.transport_options.get("predefined_queues") or {}).values():
            if q.get("url") == queue_url:
                return dict(q)
        return None


def call_timeout(smallest_interval: float) -> float:
    """Connect and read time-out for beats: half the shortest interval, within bounds."""
    return max(MIN_CALL_TIMEOUT, min(MAX_CALL_TIMEOUT, smallest_interval / 2))


class Clients:
    """One boto3 SQS client per set of credentials, made on first use in this process."""

    def __init__(self, broker: BrokerInfo, *, timeout: float, loader: Any = None) -> None:
        self.broker = broker
        self.timeout = timeout
        #: A botocore data loader to share (see ``_celery.kombu_loader``); None: our own.
        self._loader = loader
        self._lock = threading.Lock()
        self._clients: dict[tuple[str, str | None, str | None], Any] = {}
        self._region: str | None = None

    @property
    def region(self) -> str:
        if self._region is None:
            self._region = self.broker.region()
        return self._region

    def warm_up(self) -> None:
        """Build the default client and parse the models of the two calls a beat makes.

        botocore parses an operation's model on its first call; done here, before any
        task runs, the first beat of a busy process does not pay for it.
        """
        model = self.for_queue("").meta.service_model
        for operation in ("ChangeMessageVisibility", "ChangeMessageVisibilityBatch"):
            model.operation_model(operation)

    def for_queue(self, queue_url: str) -> Any:
        """The client to use for *queue_url* (a predefined queue may have its own keys)."""
        q = self.broker.predefined_queue(queue_url) or {}
        region = str(q.get("region") or self.region)
        key_id = q.get("access_key_id", self.broker.userid)
        secret = q.get("secret_access_key", self.broker.password)
        key = (region, key_id, secret)
        with self._lock:
            client = self._clients.get(key)
            if client is None:
                client = self._clients[key] = self._new_client(region, key_id, secret)
            return client

    def _new_client(self, region: str, key_id: str | None, secret: str | None) -> Any:
        import boto3
        import botocore.config
        import botocore.session

        options = self.broker.transport_options
        config = botocore.config.Config(**(options.get("client-config") or {})).merge(
            botocore.config.Config(
                connect_timeout=self.timeout,
                read_timeout=self.timeout,
                # Retries are the scheduler's: it backs off without holding up the
                # other heartbeats, and gives up when the visibility runs out.
                retries={"total_max_attempts": 1},
            )
        )
        core = botocore.session.get_session()
        if self._loader is not None:
            core.register_component("data_loader", self._loader)
        role_arn = options.get("sts_role_arn")
        if role_arn:
            session = _assumed_role_session(
                core, str(role_arn), int(options.get("sts_token_timeout", 900)), region
            )
        else:
            session = boto3.Session(
                region_name=region,
                aws_access_key_id=key_id,
                aws_secret_access_key=secret,
                botocore_session=core,
            )
        kwargs: dict[str, Any] = {"use_ssl": self.broker.is_secure}
        if self.broker.endpoint_url is not None:
            kwargs["endpoint_url"] = self.broker.endpoint_url
        return untraced(session.client("sqs", config=config, **kwargs))


def _assumed_role_session(core: Any, role_arn: str, duration: int, region: str) -> Any:
    """A boto3 session (on botocore session *core*) whose credentials assume *role_arn*
    and refresh themselves."""
    import boto3
    from botocore.credentials import RefreshableCredentials

    sts = untraced(boto3.client("sts", region_name=region))

    def fetch() -> dict[str, str]:
        creds = sts.assume_role(
            RoleArn=role_arn, RoleSessionName=STS_SESSION_NAME, DurationSeconds=duration
        )["Credentials"]
        return {
            "access_key": creds["AccessKeyId"],
            "secret_key": creds["SecretAccessKey"],
            "token": creds["SessionToken"],
            "expiry_time": creds["Expiration"].isoformat(),
        }

    # botocore has no public setter for refreshable credentials on a session.
    credentials = RefreshableCredentials.create_from_metadata(
        metadata=fetch(), refresh_using=fetch, method="sts-assume-role"
    )
    core._credentials = credentials
    core.set_config_variable("region", region)
    return boto3.Session(botocore_session=core)
