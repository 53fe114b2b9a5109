"""Settings: defaults, per-task overrides, and errors that name the bad value."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from celery import Celery

from celery_sqs_heartbeat import ConfigurationError, HeartbeatOptions, options_for
from celery_sqs_heartbeat._settings import resolve, resolve_tasks

pytestmark = pytest.mark.timeout(30)


def make_app(**conf: object) -> Celery:
    app = Celery("settings", broker="memory://", set_as_current=False)
    app.conf.update(conf)
    return app


def test_defaults() -> None:
    assert resolve(make_app().conf) == HeartbeatOptions(
        enabled=False, interval=30.0, visibility_timeout=120, max_duration=None
    )


def test_task_options_override_settings_and_annotations_set_them() -> None:
    app = make_app(
        sqs_heartbeat_enabled=True,
        sqs_heartbeat_interval=20,
        task_annotations={"settings.annotated": {"sqs_heartbeat_interval": 5}},
    )

    @app.task(name="settings.decorated", sqs_heartbeat_enabled=False)
    def decorated() -> None: ...

    @app.task(name="settings.annotated")
    def annotated() -> None: ...

    @app.task(name="settings.plain")
    def plain() -> None: ...

    app.finalize()
    assert options_for(decorated).enabled is False
    assert options_for(annotated).interval == 5.0
    assert options_for(plain) == HeartbeatOptions(True, 20.0, 120, None)


def test_durations_accept_timedelta() -> None:
    conf = make_app(
        sqs_heartbeat_interval=timedelta(seconds=15),
        sqs_heartbeat_visibility_timeout=timedelta(minutes=1),
        sqs_heartbeat_max_duration=timedelta(hours=2),
    ).conf
    assert resolve(conf) == HeartbeatOptions(False, 15.0, 60, 7200.0)


@pytest.mark.parametrize(
    ("setting", "value", "reason"),
    [
        ("sqs_heartbeat_enabled", "yes", "True or False"),
        ("sqs_heartbeat_enabled", 1, "True or False"),
        ("sqs_heartbeat_interval", 0, "> 0"),
        ("sqs_heartbeat_interval", -1, "> 0"),
        ("sqs_heartbeat_interval", "30", "number of seconds"),
        ("sqs_heartbeat_interval", True, "number of seconds"),
        ("sqs_heartbeat_interval", float("nan"), "finite"),
        ("sqs_heartbeat_visibility_timeout", 90.5, "whole number"),
        ("sqs_heartbeat_visibility_timeout", 0, "between 1 and 43200"),
        ("sqs_heartbeat_visibility_timeout", 43201, "between 1 and 43200"),
        ("sqs_heartbeat_max_duration", 0, "> 0"),
        ("sqs_heartbeat_max_duration", "1h", "number of seconds"),
    ],
)
def test_bad_values_are_named(setting: str, value: object, reason: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        resolve(make_app(**{setting: value}).conf)
    message = str(info.value)
    assert f"{setting}={value!r}" in message and reason in message
    assert info.value.setting == setting and info.value.task is None


def test_interval_must_be_shorter_than_visibility_and_blames_the_override() -> None:
    app = make_app(sqs_heartbeat_visibility_timeout=60)

    @app.task(name="settings.slow", sqs_heartbeat_interval=90)
    def slow() -> None: ...

    with pytest.raises(ConfigurationError) as info:
        options_for(slow)
    assert info.value.setting == "sqs_heartbeat_interval"
    assert info.value.task == "settings.slow"
    assert "'settings.slow'" in str(info.value) and "shorter than" in str(info.value)

    with pytest.raises(ConfigurationError) as info:
        resolve(make_app(sqs_heartbeat_interval=120).conf)
    assert info.value.setting == "sqs_heartbeat_interval" and info.value.task is None


def test_django_style_namespace() -> None:
    """Settings read with a CELERY_ namespace (Django) are found under our names."""
    import types

    module = types.ModuleType("djsettings")
    module.CELERY_SQS_HEARTBEAT_ENABLED = True  # type: ignore[attr-defined]
    module.CELERY_SQS_HEARTBEAT_INTERVAL = 12  # type: ignore[attr-defined]
    app = Celery("dj", set_as_current=False)
    app.config_from_object(module, namespace="CELERY")
    assert resolve(app.conf) == HeartbeatOptions(True, 12.0, 120, None)


class _Namespaced:
    """Django's settings, read with ``namespace="CELERY"``."""

    CELERY_SQS_HEARTBEAT_ENABLED = True
    CELERY_SQS_HEARTBEAT_INTERVAL = 10


def test_names_the_heartbeat_reads_pass_in_every_spelling_celery_maps() -> None:
    app = make_app(sqs_heartbeat_enabled=True, sqs_heartbeat_own_process=False)

    @app.task(name="settings.paced", sqs_heartbeat_interval=5, sqs_heartbeat_interrupt=True)
    def paced() -> None: ...

    app.finalize()
    assert resolve_tasks(app)["settings.paced"].interval == 5.0
    django = Celery("django", broker="memory://", set_as_current=False)
    django.config_from_object(_Namespaced, namespace="CELERY")
    assert resolve_tasks(django)["celery.backend_cleanup"].interval == 10.0


@pytest.mark.parametrize(
    ("conf", "named"),
    [
        ({"sqs_heartbeat": True}, "setting sqs_heartbeat=True: no such setting (did you mean"),
        (
            {"sqs_heartbeat_intervl": 5},
            "setting sqs_heartbeat_intervl=5: no such setting "
            "(did you mean sqs_heartbeat_interval?)",
        ),
        (
            {"CELERY_SQS_HEARTBEAT_BEAT_PROCESS": False},
            "setting CELERY_SQS_HEARTBEAT_BEAT_PROCESS=False: it is named "
            "sqs_heartbeat_own_process now",
        ),
        (
            {"SQS_HEARTBEAT_ENABLED": True},
            "setting SQS_HEARTBEAT_ENABLED=True: Celery does not read it under this name: "
            "write sqs_heartbeat_enabled",
        ),
    ],
)
def test_a_setting_the_heartbeat_would_never_read_stops_the_worker(
    conf: dict[str, object], named: str
) -> None:
    """Ignored, it would leave every long task unprotected without a word."""
    with pytest.raises(ConfigurationError, match=re.escape(named)):
        resolve_tasks(make_app(**conf))


def test_a_namespaced_typo_is_named_as_written() -> None:
    class Typo(_Namespaced):
        CELERY_SQS_HEARTBEAT_VISIBILITY = 60

    app = Celery("django", broker="memory://", set_as_current=False)
    app.config_from_object(Typo, namespace="CELERY")
    with pytest.raises(ConfigurationError, match="CELERY_SQS_HEARTBEAT_VISIBILITY=60: no such"):
        resolve_tasks(app)


@pytest.mark.parametrize(
    ("option", "reason"),
    [
        (
            "sqs_heartbeat_max_duraton",
            "no such task option (did you mean sqs_heartbeat_max_duration?)",
        ),
        ("sqs_heartbeat_own_process", "it is worker-wide: set it in the configuration"),
        (
            "sqs_heartbeat_beat_process",
            "it is named sqs_heartbeat_own_process now, worker-wide: set it in the configuration",
        ),
    ],
)
def test_a_task_option_the_heartbeat_would_never_read_stops_the_worker(
    option: str, reason: str
) -> None:
    app = make_app(sqs_heartbeat_enabled=True)

    def odd() -> None: ...

    app.task(name="settings.odd", shared=False, **{option: 60})(odd)
    app.finalize()
    with pytest.raises(
        ConfigurationError, match=re.escape(f"{option}=60 of task 'settings.odd': {reason}")
    ):
        resolve_tasks(app)
