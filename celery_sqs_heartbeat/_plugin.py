"""The package's ``celery.commands`` entry point.

The ``celery`` program imports every such entry point when it starts, so importing this
module is what installs the heartbeat, for every app, in workers started with
``celery worker``, without any user module importing the package. It also gives the
program the ``sqs-heartbeat`` command (``_cli``).
"""

from __future__ import annotations

from . import _handlers
from ._cli import sqs_heartbeat

__all__ = ["sqs_heartbeat"]

_handlers.connect(None)
