"""Sending visibility changes: batches, and the fall-back to single calls (Stubber)."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from botocore.stub import Stubber

from celery_sqs_heartbeat._errors import Failure
from celery_sqs_heartbeat._send import Sender

pytestmark = pytest.mark.timeout(30)

QUEUE = "https://sqs.us-east-1.amazonaws.com/123456789012/jobs"


def expect_single(stubber: Stubber, rh: str) -> None:
    stubber.add_response(
        "change_message_visibility",
        {},
        {"QueueUrl": QUEUE, "ReceiptHandle": rh, "VisibilityTimeout": 30},
    )


@pytest.mark.parametrize(
    "code", ["AWS.SimpleQueueService.UnsupportedOperation", "InvalidAction", "UnknownOperation"]
)
def test_an_endpoint_without_the_batch_action_gets_single_calls_from_then_on(
    stubbed: tuple[Any, Stubber], caplog: pytest.LogCaptureFixture, code: str
) -> None:
    client, stubber = stubbed
    stubber.add_client_error("change_message_visibility_batch", code, "not implemented", 400)
    for rh in ("a", "b", "c", "d"):
        expect_single(stubber, rh)
    sender = Sender(lambda url: client)
    caplog.set_level(logging.INFO, "celery_sqs_heartbeat")

    first = sender.send(QUEUE, [("a", 30), ("b", 30)])
    second = sender.send(QUEUE, [("c", 30), ("d", 30)])  # no batch tried again

    assert [a.failure for a in first + second] == [None] * 4
    stubber.assert_no_pending_responses()
    said = [r for r in caplog.records if "ChangeMessageVisibilityBatch" in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.INFO


def test_single_calls_fail_one_by_one(stubbed: tuple[Any, Stubber]) -> None:
    client, stubber = stubbed
    stubber.add_client_error("change_message_visibility_batch", "InvalidAction", "no", 400)
    expect_single(stubber, "a")
    stubber.add_client_error("change_message_visibility", "ReceiptHandleIsInvalid", "gone", 400)

    answers = Sender(lambda url: client).send(QUEUE, [("a", 30), ("b", 30)])

    assert [a.failure for a in answers] == [None, Failure.GONE]
    assert "ReceiptHandleIsInvalid" in answers[1].detail


def test_other_batch_errors_are_classified_not_retried_as_singles(
    stubbed: tuple[Any, Stubber],
) -> None:
    client, stubber = stubbed
    stubber.add_client_error("change_message_visibility_batch", "RequestThrottled", "slow", 400)

    answers = Sender(lambda url: client).send(QUEUE, [("a", 30), ("b", 30)])

    assert [a.failure for a in answers] == [Failure.TRANSIENT, Failure.TRANSIENT]
    stubber.assert_no_pending_responses()
