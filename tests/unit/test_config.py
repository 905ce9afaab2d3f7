import pytest

from asvp_backend.config import ConfigError, Settings, env_names


def test_defaults_are_the_embedded_mode():
    settings = Settings.from_env({})
    assert settings.embedded and settings.port == 9090 and settings.backbone == "tf_efficientnet_lite0"


def test_reads_label_studio_names():
    settings = Settings.from_env(
        {
            "LABEL_STUDIO_URL": "http://ls:8080/",
            "LABEL_STUDIO_API_KEY": "abc",
            "REDIS_URL": "redis://r:6379/0",
            "DEVICE": "CUDA",
            "PUSH_TOP_K": "500",
            "ALLOW_PRIVATE_IMAGE_HOSTS": "yes",
        }
    )
    assert settings.label_studio_url == "http://ls:8080"
    assert settings.device == "cuda" and settings.push_top_k == 500 and settings.allow_private_image_hosts
    assert not settings.embedded


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"DEVICE": "gpu"}, "DEVICE must be one of auto, cpu, cuda"),
        ({"PORT": "http"}, "PORT must be an integer"),
        ({"PORT": "70000"}, "PORT must be between"),
        (
            {"LABEL_STUDIO_URL": "localhost:8080", "LABEL_STUDIO_API_KEY": "k"},
            "LABEL_STUDIO_URL must be an http",
        ),
        ({"LABEL_STUDIO_API_KEY": "k"}, "LABEL_STUDIO_URL is required"),
        ({"REDIS_URL": "localhost"}, "REDIS_URL must look like"),
        ({"BASIC_AUTH_USER": "u"}, "set together"),
        ({"EPSILON": "2"}, "EPSILON must be between"),
        ({"ALLOW_PRIVATE_IMAGE_HOSTS": "maybe"}, "true or false"),
        ({"RETRAIN_EVERY": "0"}, "RETRAIN_EVERY must be auto or an integer >= 1"),
        ({"RETRAIN_EVERY": "often"}, "RETRAIN_EVERY must be auto or an integer >= 1"),
    ],
)
def test_bad_values_are_refused_with_the_variable_name(env, message):
    with pytest.raises(ConfigError, match=message):
        Settings.from_env(env)


def test_retrain_every_defaults_to_auto_and_keeps_an_explicit_number():
    default = Settings.from_env({})
    assert default.retrain_cadence == "auto"
    assert default.retrain_every == 1  # what a sync checks: the round job applies the project's cadence
    assert Settings.from_env({"RETRAIN_EVERY": " Auto "}).retrain_cadence == "auto"
    explicit = Settings.from_env({"RETRAIN_EVERY": "10"})
    assert explicit.retrain_cadence == explicit.retrain_every == explicit.selection_batch == 10
    assert Settings.from_env({}).redacted()["RETRAIN_EVERY"] == "auto"


def test_redacted_hides_every_secret():
    settings = Settings.from_env(
        {
            "LABEL_STUDIO_URL": "http://ls:8080",
            "LABEL_STUDIO_API_KEY": "supersecretkey",
            "BASIC_AUTH_USER": "u",
            "BASIC_AUTH_PASS": "hunter22",
            "WEBHOOK_SECRET": "whsecret",
            "REDIS_URL": "redis://:redispass@r:6379/0",
        }
    )
    text = str(settings.redacted())
    for secret in ("supersecretkey", "hunter22", "whsecret", "redispass"):
        assert secret not in text


def test_env_example_lists_every_variable():
    from pathlib import Path

    example = (Path(__file__).resolve().parents[2] / ".env.example").read_text()
    missing = [name for name in env_names() if name not in example]
    assert not missing, f".env.example lacks {missing}"
