"""Settings: the one reader of environment variables, and the one boolean parser."""

from __future__ import annotations

from pathlib import Path

import pytest

from serve.errors import InvalidRequestError
from serve.settings import ENV_VARS, Settings, default_cache_dir, parse_bool

BASE_ENV = {"HOME": "/home/alice"}


@pytest.mark.parametrize("value", ["1", "true", "TRUE", "True", "yes", "YES", "on", "On", " true "])
def test_parse_bool_true(value):
    assert parse_bool(value, False) is True


@pytest.mark.parametrize("value", ["0", "false", "FALSE", "no", "No", "off", "OFF", " 0\n"])
def test_parse_bool_false(value):
    assert parse_bool(value, True) is False


@pytest.mark.parametrize("value", [None, "", "   "])
@pytest.mark.parametrize("default", [True, False])
def test_parse_bool_unset_is_default(value, default):
    assert parse_bool(value, default) is default


@pytest.mark.parametrize("value", ["ture", "2", "y", "n", "enabled", "-1", "truee", "t"])
def test_parse_bool_rejects_garbage_naming_variable(value):
    with pytest.raises(ValueError) as info:
        parse_bool(value, False, name="DARKROOM_SOMETHING")
    assert isinstance(info.value, InvalidRequestError)
    assert info.value.field == "DARKROOM_SOMETHING"
    assert "DARKROOM_SOMETHING" in str(info.value)
    assert repr(value) in str(info.value)


def test_defaults():
    settings = Settings.from_env(BASE_ENV)
    assert settings.cache_dir == Path("/home/alice/.cache/darkroom")
    assert settings.device is None
    assert settings.dtype is None
    assert settings.api_keys == ()
    assert settings.log_level == "WARNING"


def test_from_env_reads_os_environ_by_default(monkeypatch):
    monkeypatch.setenv("DARKROOM_LOG_LEVEL", "debug")
    monkeypatch.setenv("DARKROOM_CACHE_DIR", "/tmp/dr-cache")
    settings = Settings.from_env()
    assert settings.log_level == "DEBUG"
    assert settings.cache_dir == Path("/tmp/dr-cache")


def test_empty_mapping_does_not_read_os_environ(monkeypatch):
    monkeypatch.setenv("DARKROOM_LOG_LEVEL", "debug")
    assert Settings.from_env({}).log_level == "WARNING"


def test_xdg_cache_home():
    env = {**BASE_ENV, "XDG_CACHE_HOME": "/var/cache/alice"}
    assert Settings.from_env(env).cache_dir == Path("/var/cache/alice/darkroom")
    assert default_cache_dir(env) == Path("/var/cache/alice/darkroom")


def test_relative_xdg_cache_home_is_ignored():
    # The XDG spec says relative values are invalid and must be ignored.
    env = {**BASE_ENV, "XDG_CACHE_HOME": "cache"}
    assert Settings.from_env(env).cache_dir == Path("/home/alice/.cache/darkroom")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("/data/darkroom", Path("/data/darkroom")),
        ("~/models", Path("/home/alice/models")),
        ("~", Path("/home/alice")),
        ("relative/dir", Path("relative/dir")),
        ("", Path("/xdg/darkroom")),  # empty counts as unset: the default applies
    ],
)
def test_cache_dir(raw, expected):
    env = {**BASE_ENV, "XDG_CACHE_HOME": "/xdg", "DARKROOM_CACHE_DIR": raw}
    assert Settings.from_env(env).cache_dir == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("cpu", "cpu"),
        ("CPU", "cpu"),
        ("cuda", "cuda"),
        ("cuda:0", "cuda:0"),
        ("cuda:3", "cuda:3"),
        (" Cuda:01 ", "cuda:1"),
        ("auto", None),
        ("", None),
    ],
)
def test_device(raw, expected):
    assert Settings.from_env({**BASE_ENV, "DARKROOM_DEVICE": raw}).device == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("float32", "float32"),
        ("float16", "float16"),
        ("bfloat16", "bfloat16"),
        ("FP16", "float16"),
        ("fp32", "float32"),
        ("bf16", "bfloat16"),
        ("half", "float16"),
        ("auto", None),
        ("", None),
    ],
)
def test_dtype(raw, expected):
    assert Settings.from_env({**BASE_ENV, "DARKROOM_DTYPE": raw}).dtype == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("", ()),
        ("k1", ("k1",)),
        ("k1,k2", ("k1", "k2")),
        (" k1 , k2 ,, ", ("k1", "k2")),
        ("k1,k2,k1", ("k1", "k2")),
        (",", ()),
    ],
)
def test_api_keys(raw, expected):
    assert Settings.from_env({**BASE_ENV, "DARKROOM_API_KEYS": raw}).api_keys == expected


def test_api_keys_not_in_repr():
    settings = Settings.from_env({**BASE_ENV, "DARKROOM_API_KEYS": "sk-secret-123"})
    assert settings.api_keys == ("sk-secret-123",)
    assert "sk-secret-123" not in repr(settings)
    assert "sk-secret-123" not in str(settings)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("debug", "DEBUG"),
        ("INFO", "INFO"),
        ("Warning", "WARNING"),
        ("warn", "WARNING"),
        ("critical", "CRITICAL"),
    ],
)
def test_log_level(raw, expected):
    assert Settings.from_env({**BASE_ENV, "DARKROOM_LOG_LEVEL": raw}).log_level == expected


@pytest.mark.parametrize(
    ("var", "raw"),
    [
        ("DARKROOM_DEVICE", "gpu"),
        ("DARKROOM_DEVICE", "cuda:"),
        ("DARKROOM_DEVICE", "cuda:x"),
        ("DARKROOM_DEVICE", "cuda:-1"),
        ("DARKROOM_DEVICE", "mps"),
        ("DARKROOM_DEVICE", "cpu:0"),
        ("DARKROOM_DTYPE", "float64"),
        ("DARKROOM_DTYPE", "int8"),
        ("DARKROOM_DTYPE", "fp8"),
        ("DARKROOM_LOG_LEVEL", "verbose"),
        ("DARKROOM_LOG_LEVEL", "10"),
    ],
)
def test_bad_values_name_the_variable(var, raw):
    with pytest.raises(InvalidRequestError) as info:
        Settings.from_env({**BASE_ENV, var: raw})
    assert info.value.field == var
    assert str(info.value).startswith(f"{var}: ")
    assert repr(raw) in str(info.value)


def test_settings_frozen_and_strict():
    settings = Settings.from_env(BASE_ENV)
    with pytest.raises(ValueError):
        settings.device = "cpu"  # type: ignore[misc]
    with pytest.raises(ValueError):
        Settings(unknown=1)  # type: ignore[call-arg]
    with pytest.raises(ValueError):
        Settings(device="gpu")
    with pytest.raises(ValueError):
        Settings(device=0)  # type: ignore[arg-type]


def test_direct_construction_normalizes():
    settings = Settings(cache_dir=Path("/c"), device="CUDA", dtype="fp16", api_keys="a, b", log_level="warn")
    assert (settings.device, settings.dtype, settings.log_level) == ("cuda", "float16", "WARNING")
    assert settings.api_keys == ("a", "b")
    assert Settings(api_keys=["x", " y ", ""]).api_keys == ("x", "y")


def test_every_field_described_and_mapped_to_a_variable():
    assert set(ENV_VARS) == set(Settings.model_fields)
    for name, field in Settings.model_fields.items():
        assert field.description, name
        assert ENV_VARS[name] in field.description
