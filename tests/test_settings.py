from pathlib import Path

import pytest

from stream.settings import Settings, SettingsError, settings_table


def test_defaults_serve_the_local_broker():
    s = Settings.from_env({})
    assert s.kafka_bootstrap == "127.0.0.1:9092"
    assert s.broker_port == 9092
    assert s.topic_clickstream == "clickstream"
    assert s.output_topics == ("clickstream-dlq", "purchase-intent", "churn-alerts")
    assert s.device == "auto"


def test_env_values_are_parsed_to_their_types():
    s = Settings.from_env(
        {
            "INTENTSTREAM_KAFKA_BOOTSTRAP": "127.0.0.1:19092,127.0.0.1:19094",
            "INTENTSTREAM_PARTITIONS": "12",
            "INTENTSTREAM_BATCH_MAX_MS": "7.5",
            "INTENTSTREAM_STATE_DIR": "/tmp/x",
            "INTENTSTREAM_DEVICE": "cuda:1",
            "INTENTSTREAM_LOG_LEVEL": "debug",
            "INTENTSTREAM_EMIT_POLICY": "every_event",
        }
    )
    assert s.broker_port == 19092
    assert s.partitions == 12
    assert s.batch_max_ms == 7.5
    assert s.state_dir == Path("/tmp/x")
    assert s.device == "cuda:1"
    assert s.log_level == "DEBUG"
    assert s.emit_policy == "every_event"


def test_overrides_win_over_the_environment():
    s = Settings.from_env({"INTENTSTREAM_PARTITIONS": "3"}, partitions=5)
    assert s.partitions == 5


@pytest.mark.parametrize(
    ("var", "value", "message"),
    [
        ("INTENTSTREAM_PARTITIONS", "four", "INTENTSTREAM_PARTITIONS: expected a whole number, got 'four'"),
        ("INTENTSTREAM_PARTITIONS", "0", "INTENTSTREAM_PARTITIONS: must be at least 1"),
        ("INTENTSTREAM_BATCH_MAX_MS", "soon", "INTENTSTREAM_BATCH_MAX_MS: expected a number"),
        ("INTENTSTREAM_BATCH_MAX_MS", "nan", "INTENTSTREAM_BATCH_MAX_MS: expected a finite number"),
        ("INTENTSTREAM_EMIT_POLICY", "sometimes", "expected one of on_change, every_event"),
        ("INTENTSTREAM_KAFKA_BOOTSTRAP", "localhost", "is not host:port"),
        ("INTENTSTREAM_KAFKA_BOOTSTRAP", "h:99999", "is not host:port"),
        ("INTENTSTREAM_DEVICE", "tpu", "INTENTSTREAM_DEVICE: 'tpu' is not one of auto, cpu, cuda, cuda:N"),
        ("INTENTSTREAM_STATE_DIR", "  ", "expected a path"),
        ("INTENTSTREAM_BATCH_MAX_EVENTZ", "5", "INTENTSTREAM_BATCH_MAX_EVENTZ: unknown setting"),
        ("INTENTSTREAM_WEB_URL", "http://0.0.0.0:6066", "is not a URL other workers can reach"),
        ("INTENTSTREAM_WEB_URL", "worker-1:6066", "is not a URL other workers can reach"),
    ],
)
def test_bad_values_name_the_variable_and_the_problem(var, value, message):
    with pytest.raises(SettingsError) as err:
        Settings.from_env({var: value})
    assert message in str(err.value)


def test_the_advertised_url_is_never_a_bind_all_address():
    import socket

    assert Settings.from_env({}).advertised_url == "http://127.0.0.1:6066"
    bound_to_all = Settings.from_env({"INTENTSTREAM_WEB_HOST": "0.0.0.0", "INTENTSTREAM_WEB_PORT": "7000"})
    assert bound_to_all.advertised_url == f"http://{socket.gethostname()}:7000"
    given = Settings.from_env({"INTENTSTREAM_WEB_HOST": "0.0.0.0", "INTENTSTREAM_WEB_URL": "http://worker-2:6066/"})
    assert given.advertised_url == "http://worker-2:6066"


def test_sasl_needs_a_mechanism():
    with pytest.raises(SettingsError, match="KAFKA_SASL_MECHANISM"):
        Settings.from_env({"INTENTSTREAM_KAFKA_SECURITY_PROTOCOL": "sasl_ssl"})


def test_secrets_are_masked_in_the_public_view():
    s = Settings.from_env(
        {
            "INTENTSTREAM_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
            "INTENTSTREAM_KAFKA_SASL_MECHANISM": "PLAIN",
            "INTENTSTREAM_KAFKA_SASL_PASSWORD": "hunter2",
        }
    )
    assert s.public_dict()["kafka_sasl_password"] == "***"
    assert "hunter2" not in repr(s.public_dict())


def test_the_readme_table_lists_every_setting():
    table = settings_table()
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    for line in table.splitlines()[2:]:
        var = line.split("`")[1]
        assert var in readme, f"{var} is missing from the README's settings table"
