"""What a failed beat means, and so what the heartbeat does next.

SQS's JSON protocol answers with two error codes (``Error.Code`` and the query-compatible
``Error.QueryErrorCode``), real SQS and moto disagree on the code for a deleted message,
and a batch reports per-entry failures inside a 200 response. This module turns all of
that into one of five classes, so the scheduler decides on a class, never on a string.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    HTTPClientError,
    NoCredentialsError,
    PartialCredentialsError,
)
from botocore.exceptions import (
    ConnectionError as BotoConnectionError,
)

#: The IAM action a beat needs. ``ChangeMessageVisibilityBatch`` is authorised by it too.
IAM_ACTION = "sqs:ChangeMessageVisibility"


class Failure(enum.Enum):
    """The class of a failed beat."""

    #: The message was deleted, received again by someone else, or its queue is gone:
    #: nothing left to extend, so the heartbeat ends (warning).
    GONE = "gone"
    #: Credentials or IAM refuse the call: it will not succeed by retrying, so the
    #: heartbeat ends (error naming the missing action).
    DENIED = "denied"
    #: The message reached SQS's 12-hour limit from receipt: it cannot be extended further.
    LIMIT = "limit"
    #: Throttling, 5xx, time-outs, refused connections: retried with backoff while the
    #: message's current visibility lasts.
    TRANSIENT = "transient"
    #: Anything else: retried like a transient failure, and logged with its traceback,
    #: since it means a bug here or a change in SQS.
    UNKNOWN = "unknown"


_GONE_CODES = frozenset(
    {
        "ReceiptHandleIsInvalid",
        "InvalidReceiptHandle",
        "MessageNotInflight",
        "AWS.SimpleQueueService.MessageNotInflight",
        "QueueDoesNotExist",
        "AWS.SimpleQueueService.NonExistentQueue",
    }
)
_DENIED_CODES = frozenset(
    {
        "AccessDenied",
        "AccessDeniedException",
        "AuthorizationError",
        "InvalidClientTokenId",
        "UnrecognizedClientException",
        "SignatureDoesNotMatch",
        "InvalidSecurity",
        "IncompleteSignature",
        "MissingAuthenticationToken",
    }
)
_TRANSIENT_CODES = frozenset(
    {
        "RequestThrottled",
        "ThrottlingException",
        "Throttling",
        "TooManyRequestsException",
        "RequestLimitExceeded",
        "ServiceUnavailable",
        "ServiceUnavailableException",
        "InternalError",
        "InternalFailure",
        "RequestTimeout",
        "RequestTimeoutException",
        "ExpiredToken",
        "ExpiredTokenException",
        "RequestExpired",
    }
)
_INVALID_PARAMETER_CODES = frozenset(
    {
        "InvalidParameterValue",
        "AWS.SimpleQueueService.InvalidParameterValue",
        "InvalidParameterValueException",
    }
)
#: What an endpoint that lacks an action answers (GoAws, for one, has no
#: ``ChangeMessageVisibilityBatch``): the batch is then sent as single calls.
_UNSUPPORTED_CODES = frozenset(
    {
        "UnsupportedOperation",
        "AWS.SimpleQueueService.UnsupportedOperation",
        "InvalidAction",
        "UnknownOperation",
        "UnknownOperationException",
        "NotImplemented",
    }
)
#: Fragments of an ``InvalidParameterValue`` message. Real SQS says a message that was
#: deleted or received again "does not exist or is not available for visibility timeout
#: change"; past the 12-hour cap it says the total is "beyond the limit".
_GONE_PHRASES = ("not available", "does not exist")
_LIMIT_PHRASES = ("beyond the limit", "43200")


def classify_code(
    codes: tuple[str | None, ...], message: str = "", *, server_fault: bool = False
) -> Failure:
    """Classify an SQS error by its codes (main and query-compatible) and message."""
    known = {c for c in codes if c}
    if known & _GONE_CODES:
        return Failure.GONE
    if known & _DENIED_CODES:
        return Failure.DENIED
    # Before the server-fault test: LocalStack marks a deleted message's batch entry
    # InvalidParameterValueException with SenderFault false.
    if known & _INVALID_PARAMETER_CODES:
        text = message.lower()
        if any(p in text for p in _LIMIT_PHRASES):
            return Failure.LIMIT
        if any(p in text for p in _GONE_PHRASES):
            return Failure.GONE
    if known & _TRANSIENT_CODES or server_fault:
        return Failure.TRANSIENT
    return Failure.UNKNOWN


def classify_exception(exc: BaseException) -> Failure:
    """Classify an exception raised by a boto3 SQS call."""
    if isinstance(exc, ClientError):
        error: Mapping[str, Any] = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        return classify_code(
            (error.get("Code"), error.get("QueryErrorCode")),
            str(error.get("Message", "")),
            server_fault=status >= 500,
        )
    if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
        return Failure.DENIED
    if isinstance(exc, (BotoConnectionError, HTTPClientError, OSError)):
        return Failure.TRANSIENT
    if isinstance(exc, BotoCoreError):
        return Failure.UNKNOWN
    return Failure.UNKNOWN


def is_unsupported(exc: BaseException) -> bool:
    """Whether *exc* says the endpoint does not implement the action called."""
    if not isinstance(exc, ClientError):
        return False
    error: Mapping[str, Any] = exc.response.get("Error", {})
    return bool({error.get("Code"), error.get("QueryErrorCode")} & _UNSUPPORTED_CODES)


def describe(exc: BaseException) -> str:
    """A one-line description of an SQS call's exception, for logs and signals."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        err = response.get("Error", {})
        return f"{err.get('Code', type(exc).__name__)}: {err.get('Message', '')}".strip(": ")
    return f"{type(exc).__name__}: {exc}"


def classify_batch_entry(entry: Mapping[str, Any]) -> Failure:
    """Classify one entry of ``ChangeMessageVisibilityBatch``'s ``Failed`` list."""
    return classify_code(
        (entry.get("Code"),),
        str(entry.get("Message", "")),
        server_fault=entry.get("SenderFault") is False,
    )


def queue_arn(queue_url: str, region: str | None) -> str:
    """The ARN of the queue at *queue_url*, for an IAM policy a person can paste."""
    parts = urlsplit(queue_url)
    segments = [s for s in parts.path.split("/") if s]
    account, name = (segments[-2], segments[-1]) if len(segments) >= 2 else ("*", queue_url)
    host = parts.hostname or ""
    host_parts = host.split(".")
    if len(host_parts) >= 4 and host_parts[0] == "sqs" and host.endswith(".amazonaws.com"):
        region = host_parts[1]
    return f"arn:aws:sqs:{region or '*'}:{account}:{name}"


def describe_denied(queue_url: str, region: str | None) -> str:
    """A message that tells an operator which IAM permission to grant."""
    return (
        f"the worker's AWS credentials may not call {IAM_ACTION} on {queue_url}; grant "
        f'{{"Effect": "Allow", "Action": "{IAM_ACTION}", '
        f'"Resource": "{queue_arn(queue_url, region)}"}}'
    )
