"""Settings: one object, read from flags and the environment in one place, checked there."""

from __future__ import annotations

import pytest

from events.worker import WorkerConfig
from server.settings import Settings, SettingsError, env_name, from_env


def test_every_setting_is_read_from_its_variable() -> None:
    """Each field has one variable (TASKCAST_<FIELD>, DATABASE_URL, REDIS_URL), lists are
    comma-separated, and flags given win over the environment."""
    env = {"DATABASE_URL": "postgresql://x/y", "TASKCAST_RATE_PER_S": "50", "TASKCAST_LEASE_S": "2.5",
           "TASKCAST_ALLOWED_ORIGINS": "https://a.example, https://b.example", "TASKCAST_PORT": "9000",
           "TASKCAST_MAX_SUBSCRIPTIONS": "7", "TASKCAST_SECRET": "", "TASKCAST_REUSE_PORT": "Yes"}
    s = from_env(env, port=9100, host=None)
    assert (s.database_url, s.rate_per_s, s.lease_s, s.port, s.host) == \
        ("postgresql://x/y", 50, 2.5, 9100, "127.0.0.1")
    assert s.allowed_origins == ("https://a.example", "https://b.example")
    assert s.max_subscriptions == 7 and s.secret is None and s.reuse_port is True
    assert env_name("max_frame_bytes") == "TASKCAST_MAX_FRAME_BYTES"


def test_defaults_come_from_the_code_they_configure() -> None:
    """A worker built from default Settings is a default worker: no default is repeated."""
    assert Settings().worker_config() == WorkerConfig(stop_s=Settings().stop_timeout_s)


@pytest.mark.parametrize(("env", "variable"), [
    ({"TASKCAST_RATE_PER_S": "fast"}, "TASKCAST_RATE_PER_S"),
    ({"TASKCAST_LEASE_S": "0"}, "TASKCAST_LEASE_S"),
    ({"TASKCAST_PORT": "70000"}, "TASKCAST_PORT"),
    ({"TASKCAST_WORKER_METRICS_PORT": "-1"}, "TASKCAST_WORKER_METRICS_PORT"),
    ({"TASKCAST_RELAY_METRICS_PORT": "70000"}, "TASKCAST_RELAY_METRICS_PORT"),
    ({"TASKCAST_MAX_JSON_DEPTH": "-1"}, "TASKCAST_MAX_JSON_DEPTH"),
    ({"TASKCAST_MAX_JSON_DEPTH": "255"}, "TASKCAST_MAX_JSON_DEPTH"),  # deeper than orjson encodes
    ({"TASKCAST_ALLOWED_ORIGINS": "evil.example"}, "TASKCAST_ALLOWED_ORIGINS"),
    ({"TASKCAST_PROCESSES": "0"}, "TASKCAST_PROCESSES"),
    ({"TASKCAST_REUSE_PORT": "maybe"}, "TASKCAST_REUSE_PORT"),
    ({"REDIS_URL": "http://127.0.0.1:6379"}, "REDIS_URL"),
    ({"REDIS_URL": "redis+cluster://127.0.0.1"}, "REDIS_URL"),  # no port
    ({"REDIS_URL": "redis+cluster://127.0.0.1:7000/3"}, "REDIS_URL"),  # a cluster has database 0 only
])
def test_a_bad_value_is_refused_naming_its_variable(env: dict[str, str], variable: str) -> None:
    """A value no process could run with stops the start with the variable's name."""
    with pytest.raises(SettingsError, match=variable):
        from_env(env)
