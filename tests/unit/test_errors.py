"""Error classification: both error codes, moto's and real SQS's, batch entries."""

from __future__ import annotations

import pytest
from botocore.exceptions import (
    ClientError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    ReadTimeoutError,
)

from celery_sqs_heartbeat._errors import (
    IAM_ACTION,
    Failure,
    classify_batch_entry,
    classify_exception,
    describe_denied,
    queue_arn,
)

pytestmark = pytest.mark.timeout(30)


def client_error(
    code: str, message: str = "", status: int = 400, query: str | None = None
) -> ClientError:
    error = {"Code": code, "Message": message}
    if query:
        error["QueryErrorCode"] = query
    return ClientError(
        {"Error": error, "ResponseMetadata": {"HTTPStatusCode": status}},  # type: ignore[typeddict-item]
        "ChangeMessageVisibility",
    )


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (client_error("ReceiptHandleIsInvalid"), Failure.GONE),  # moto, after delete
        (
            client_error(
                "InvalidParameterValue",
                "Value x for parameter ReceiptHandle is invalid. Reason: Message does "
                "not exist or is not available for visibility timeout change.",
            ),
            Failure.GONE,
        ),  # real SQS
        (client_error("AWS.SimpleQueueService.MessageNotInflight"), Failure.GONE),
        (
            client_error("SomethingNew", query="AWS.SimpleQueueService.MessageNotInflight"),
            Failure.GONE,
        ),
        (
            client_error("QueueDoesNotExist", query="AWS.SimpleQueueService.NonExistentQueue"),
            Failure.GONE,
        ),
        (
            client_error(
                "InvalidParameterValue",
                "Value 600 for parameter VisibilityTimeout is invalid. Reason: Total "
                "VisibilityTimeout for the message is beyond the limit [43200 seconds]",
            ),
            Failure.LIMIT,
        ),
        (client_error("AccessDenied", status=403), Failure.DENIED),
        (client_error("AccessDeniedException", status=400), Failure.DENIED),
        (client_error("InvalidClientTokenId", status=403), Failure.DENIED),
        (client_error("RequestThrottled"), Failure.TRANSIENT),
        (client_error("ThrottlingException"), Failure.TRANSIENT),
        (client_error("InternalError", status=500), Failure.TRANSIENT),
        (client_error("Whatever", status=503), Failure.TRANSIENT),
        (EndpointConnectionError(endpoint_url="http://127.0.0.1:1"), Failure.TRANSIENT),
        (ConnectTimeoutError(endpoint_url="http://127.0.0.1:1"), Failure.TRANSIENT),
        (ReadTimeoutError(endpoint_url="http://127.0.0.1:1"), Failure.TRANSIENT),
        (ConnectionRefusedError(), Failure.TRANSIENT),
        (NoCredentialsError(), Failure.DENIED),
        (client_error("InvalidParameterValue", "something else"), Failure.UNKNOWN),
        (ValueError("a bug"), Failure.UNKNOWN),
    ],
)
def test_classify_exception(error: BaseException, expected: Failure) -> None:
    assert classify_exception(error) is expected


def test_classify_batch_entries() -> None:
    assert (
        classify_batch_entry(
            {"Id": "0", "SenderFault": True, "Code": "ReceiptHandleIsInvalid", "Message": "x"}
        )
        is Failure.GONE
    )
    assert (
        classify_batch_entry(
            {"Id": "1", "SenderFault": False, "Code": "InternalError", "Message": ""}
        )
        is Failure.TRANSIENT
    )
    assert (
        classify_batch_entry({"Id": "2", "SenderFault": False, "Code": "NeverHeardOf"})
        is Failure.TRANSIENT
    )  # the server's fault: worth a retry


def test_denied_message_names_the_action_and_resource() -> None:
    url = "https://sqs.eu-west-1.amazonaws.com/123456789012/videos"
    assert queue_arn(url, None) == "arn:aws:sqs:eu-west-1:123456789012:videos"
    assert queue_arn("http://localhost:4566/000000000000/q", "us-east-2") == (
        "arn:aws:sqs:us-east-2:000000000000:q"
    )
    text = describe_denied(url, "us-east-1")
    assert IAM_ACTION in text and "arn:aws:sqs:eu-west-1:123456789012:videos" in text


def test_localstacks_batch_entry_for_a_deleted_message_is_gone_not_transient() -> None:
    """LocalStack marks it InvalidParameterValueException with SenderFault false."""
    entry = {
        "Id": "0",
        "SenderFault": False,
        "Code": "InvalidParameterValueException",
        "Message": "Value rh for parameter ReceiptHandle is invalid. Reason: Message does "
        "not exist or is not available for visibility timeout change.",
    }
    assert classify_batch_entry(entry) is Failure.GONE
