"""Datadog's ddtrace: the heartbeat's own clients make no span, a user's client does.

Run in a process of its own (ddtrace patches botocore for the whole process, and starts
threads of its own), with the real ddtrace and SQS calls to the session's endpoint.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from celery_sqs_heartbeat._quiet import DDTRACE_PIN, untraced

from ..conftest import SQS, hold_messages

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import json, os, sys, threading
from ddtrace import patch
from ddtrace.trace import TraceFilter, tracer
import boto3

spans = []

class Keep(TraceFilter):
    def process_trace(self, trace):
        spans.extend(s.resource for s in trace)
        return None  # nothing goes to an agent

patch(botocore=True)
tracer.configure(trace_processors=[Keep()])

from celery_sqs_heartbeat._quiet import untraced
from celery_sqs_heartbeat._send import Sender

url, handles = sys.argv[1], sys.argv[2:]
def client():
    return boto3.client("sqs", endpoint_url=os.environ["ENDPOINT"])

def beats(c):
    # As the heartbeat sends them: one batch, one single call, from a thread of its own.
    sender = Sender(lambda _: c)
    def run():
        sender.send(url, [(h, 60) for h in handles])
        sender.send(url, [(handles[0], 60)])
    t = threading.Thread(target=run)
    t.start()
    t.join()
    found = [r for r in spans if "changemessagevisibility" in r]
    spans.clear()
    return found

print(json.dumps({"users": beats(client()), "heartbeats": beats(untraced(client()))}))
"""


#: Looked up, never imported here: ddtrace would patch this process.
NO_DDTRACE = importlib.util.find_spec("ddtrace") is None


@pytest.mark.skipif(NO_DDTRACE, reason="ddtrace is not installed")
def test_the_heartbeats_clients_make_no_ddtrace_span_while_a_users_do(
    sqs: SQS, tmp_path: Path
) -> None:
    client = sqs.client()
    url, handles = hold_messages(client, "ddtrace")
    env = {
        **os.environ,
        "ENDPOINT": str(sqs.endpoint_url),
        "DD_TRACE_AGENT_URL": "http://127.0.0.1:9",
        "DD_INSTRUMENTATION_TELEMETRY_ENABLED": "false",
        "DD_REMOTE_CONFIGURATION_ENABLED": "false",
    }
    try:
        out = subprocess.run(
            [sys.executable, "-c", SCRIPT, url, *handles],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=50,
        )
    finally:
        client.delete_queue(QueueUrl=url)
    assert out.returncode == 0, out.stderr
    found = json.loads(out.stdout.strip().splitlines()[-1])
    # The twin: the same beats from a client of the user's are spans of their own.
    assert found["users"] == [
        "sqs.changemessagevisibilitybatch",
        "sqs.changemessagevisibility",
    ], found
    assert found["heartbeats"] == [], found


def test_every_client_the_heartbeat_makes_is_untraced_and_nothing_else_changes() -> None:
    """Without ddtrace: one attribute on the heartbeat's own client, nothing imported."""
    import boto3

    ours = untraced(boto3.client("sqs", region_name="us-east-1"))
    theirs = boto3.client("sqs", region_name="us-east-1")
    assert getattr(ours, DDTRACE_PIN, "unset") is None
    assert getattr(theirs, DDTRACE_PIN, "unset") == "unset"
    assert "ddtrace" not in sys.modules
