"""The config surface: every setting's three spellings, precedence, validation and secrets.

The tests are parametrised over ``config.settings()``, so a setting added to the model is
checked here without touching this file (unless its valid or invalid values are special: then
the tables below say so, and a test fails until they do).
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import SecretStr

from enhanced_locking.config import (
    ENV_PREFIX,
    KEY_PREFIX,
    ConfigError,
    EnhancedLockingConfig,
    Setting,
    add_flags,
    flags_from_namespace,
    load_config,
    settings,
)
from enhanced_locking.durations import parse_duration
from enhanced_locking.policies import PolicyRules
from enhanced_locking.provider import ConfigProvider

SETTINGS = settings()
BY_FIELD = {s.field: s for s in SETTINGS}


def _ids(setting: Setting) -> str:
    return setting.key


# --- how to give a value through each source -----------------------------------------------


def _flags(values: dict[str, str]) -> dict[str, str]:
    """Parse ``--flag=value`` the way the command does, return the flags it saw."""
    parser = argparse.ArgumentParser()
    add_flags(parser)
    argv = [f"{BY_FIELD[name].flag}={value}" for name, value in values.items()]
    return flags_from_namespace(parser.parse_args(argv))


def _yaml(tmp_path: Path, values: dict[str, Any]) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({BY_FIELD[name].key: value for name, value in values.items()}))
    return path


def load_from(source: str, tmp_path: Path, values: dict[str, Any]) -> EnhancedLockingConfig:
    """Load with ``values`` (field name → value) given only through ``source``."""
    text = {name: value if isinstance(value, str) else _text(value)
            for name, value in values.items()}
    if source == "env":
        return load_config(env={BY_FIELD[name].env: value for name, value in text.items()})
    if source == "flag":
        return load_config(flags=_flags(text), env={})
    assert source == "yaml"
    return load_config(yaml_file=_yaml(tmp_path, values), env={})


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, dict):  # a role map: role=subject,subject;role=...
        return ";".join(f"{key}={','.join(items)}" for key, items in value.items())
    if isinstance(value, list):
        return ",".join(value)
    return str(value)


SOURCES = ["env", "flag", "yaml"]


# --- a valid non-default value for every setting --------------------------------------------


@dataclass(frozen=True)
class Sample:
    value: Any  # as a user writes it in YAML (env and flags get its text)
    expected: Any  # the field's value once loaded
    companions: dict[str, Any] = field(default_factory=dict)  # settings it needs with it


COMPANIONS: dict[str, dict[str, Any]] = {
    # Cross-field rules: these settings only make sense together.
    "redis_tls_ca_file": {"redis_tls": True},
    "redis_tls_cert_file": {"redis_tls_key_file": "client.key", "redis_tls": True},
    "redis_tls_key_file": {"redis_tls_cert_file": "client.crt", "redis_tls": True},
    "redis_tls_skip_verify": {"redis_tls": True},
    "redis_sentinel_addrs": {"redis_sentinel_master": "mymaster"},
    "etcd_tls_ca_file": {"etcd_tls": True},
    "etcd_tls_cert_file": {"etcd_tls_key_file": "client.key", "etcd_tls": True},
    "etcd_tls_key_file": {"etcd_tls_cert_file": "client.crt", "etcd_tls": True},
    "redis_sentinel_master": {"redis_sentinel_addrs": "s1.example:26379"},
    "tls_cert_file": {"tls_key_file": "server.key"},
    "tls_key_file": {"tls_cert_file": "server.crt"},
    "auth": {"auth_tokens_file": "tokens.csv"},
}


def sample(setting: Setting) -> Sample:
    """A valid value other than the default, derived from the setting's accepted form."""
    companions = COMPANIONS.get(setting.field, {})
    if setting.kind == "bool":
        return Sample(not setting.default, not setting.default, companions)
    if setting.kind == "choice":
        choice = next(c for c in setting.form.removeprefix("one of ").split(", ")
                      if c != setting.default)
        return Sample(choice, choice, companions)
    if setting.kind == "int":
        low, high = (int(n) for n in re.findall(r"\d+", setting.form))
        value = next(v for v in (low + 1, low + 2) if v != setting.default and v <= high)
        return Sample(value, value, companions)
    if setting.kind == "duration":
        return Sample("45s", timedelta(seconds=45), companions)
    if setting.kind == "float":
        bounds = re.findall(r"from ([\d.]+) to ([\d.]+)", setting.form)[0]
        lowest, highest = float(bounds[0]), float(bounds[1])
        share = lowest + (highest - lowest) / 4
        return Sample(share, share, companions)
    if setting.kind == "map":
        return Sample({"locker": ["group:atlantis"], "admin": ["user:alice", "group:ops"]},
                      {"locker": ["group:atlantis"], "admin": ["user:alice", "group:ops"]},
                      companions)
    if setting.kind == "list":
        return Sample(["s1.example:26379", "s2.example:26379"],
                      ["s1.example:26379", "s2.example:26379"], companions)
    if setting.kind == "str" and setting.form.startswith("host:port"):
        return Sample("redis.example:6380", "redis.example:6380", companions)
    if setting.kind == "str":
        return Sample(f"sample-{setting.field}", f"sample-{setting.field}", companions)
    if setting.kind == "rules":
        text = ('{"freezes": [{"name": "release", "match": {"repo": "acme/*"}, '
                '"message": "frozen for the release"}]}')
        return Sample(text, PolicyRules.model_validate_json(text), companions)
    raise AssertionError(f"no sample for {setting.key} of kind {setting.kind}: add one here")


def loaded(config: EnhancedLockingConfig, name: str) -> Any:
    value = getattr(config, name)
    return value.get_secret_value() if isinstance(value, SecretStr) else value


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("setting", SETTINGS, ids=_ids)
def test_each_setting_is_changed_by_its_env_var_flag_and_yaml_key(
    setting: Setting, source: str, tmp_path: Path
) -> None:
    example = sample(setting)
    config = load_from(source, tmp_path, {setting.field: example.value, **example.companions})
    assert loaded(config, setting.field) == example.expected
    assert loaded(EnhancedLockingConfig(), setting.field) != example.expected


@pytest.mark.parametrize("setting", SETTINGS, ids=_ids)
def test_each_setting_is_spelled_the_atlantis_way(setting: Setting) -> None:
    if setting.field == "data_dir":  # Atlantis's own setting keeps Atlantis's own names
        assert (setting.key, setting.env, setting.flag) == (
            "data-dir", "ATLANTIS_DATA_DIR", "--data-dir")
        return
    dashed = setting.field.replace("_", "-")
    assert setting.key == KEY_PREFIX + dashed
    assert setting.env == ENV_PREFIX + setting.field.upper()
    assert setting.flag == "--" + KEY_PREFIX + dashed
    assert setting.description, f"{setting.key} needs a description (it is in the docs)"


SEED_DEFAULTS = {
    # Every setting of the seed, with the seed's default (DESIGN §2).
    "enhanced-locking-enabled": False,
    "enhanced-locking-backend": "boltdb",
    "enhanced-locking-priority-queue": False,
    "enhanced-locking-retries": False,
    "enhanced-locking-metrics": True,
    "enhanced-locking-redis-addr": "localhost:6379",
    "enhanced-locking-redis-password": "",
    "enhanced-locking-redis-db": 0,
    "enhanced-locking-default-timeout": "30s",
    "enhanced-locking-max-timeout": "5m",
    "enhanced-locking-max-queue-size": 1000,
    "enhanced-locking-starvation-threshold": "2m",
    "enhanced-locking-max-priority-boost": 3,
}


def test_the_seeds_settings_have_the_seeds_defaults() -> None:
    shown = EnhancedLockingConfig().masked()
    assert {key: shown[key] for key in SEED_DEFAULTS} == SEED_DEFAULTS
    documented = {s.key: s.default for s in SETTINGS}
    assert {key: documented[key] for key in SEED_DEFAULTS} == SEED_DEFAULTS


def test_a_bare_bool_flag_means_true_as_in_go() -> None:
    parser = argparse.ArgumentParser()
    add_flags(parser)
    flags = flags_from_namespace(parser.parse_args(["--enhanced-locking-enabled"]))
    assert load_config(flags=flags, env={}).enabled is True
    flags = flags_from_namespace(parser.parse_args(["--enhanced-locking-metrics=false"]))
    assert load_config(flags=flags, env={}).metrics is False


def test_an_empty_env_var_leaves_a_typed_setting_at_its_default() -> None:
    config = load_config(env={"ATLANTIS_ENHANCED_LOCKING_REDIS_DB": "",
                              "ATLANTIS_ENHANCED_LOCKING_ENABLED": ""})
    assert (config.redis_db, config.enabled) == (0, False)


def test_yaml_keeps_the_rest_of_atlantiss_server_config_to_itself(tmp_path: Path) -> None:
    path = tmp_path / "atlantis.yaml"
    path.write_text("repo-allowlist: github.com/acme/*\nport: 4141\n"
                    "enhanced-locking-enabled: true\n")
    assert load_config(yaml_file=path, env={}).enabled is True


def test_a_yaml_list_and_a_comma_separated_string_mean_the_same(tmp_path: Path) -> None:
    both = {"redis_sentinel_master": "mymaster"}
    as_list = load_from("yaml", tmp_path, {"redis_sentinel_addrs": ["a:1", "b:2"], **both})
    as_text = load_from("yaml", tmp_path, {"redis_sentinel_addrs": "a:1, b:2", **both})
    assert as_list.redis_sentinel_addrs == as_text.redis_sentinel_addrs == ["a:1", "b:2"]


# --- precedence --------------------------------------------------------------------------------

PRECEDENCE = [
    # field, then its value in YAML, env and flags: three different non-default values
    ("redis_db", 1, "2", "3"),
    ("default_timeout", "10s", "20s", "40s"),
    ("backend", "memory", "redis", "memory"),
    ("enabled", True, "false", "true"),
    ("migration_weight", 10, "20", "30.5"),
]


@pytest.mark.parametrize(("name", "in_yaml", "in_env", "in_flag"), PRECEDENCE,
                         ids=[row[0] for row in PRECEDENCE])
def test_precedence_is_defaults_then_yaml_then_env_then_flags(
    name: str, in_yaml: Any, in_env: str, in_flag: str, tmp_path: Path
) -> None:
    setting = BY_FIELD[name]
    yaml_file = _yaml(tmp_path, {name: in_yaml})
    env = {setting.env: in_env}
    flags = _flags({name: in_flag})
    default = loaded(EnhancedLockingConfig(), name)

    def value(**sources: Any) -> Any:
        return loaded(load_config(**{"env": {}, **sources}), name)

    assert value() == default
    assert value(yaml_file=yaml_file) == loaded(EnhancedLockingConfig(**{name: in_yaml}), name)
    assert value(yaml_file=yaml_file, env=env) == loaded(
        EnhancedLockingConfig(**{name: in_env}), name)  # type: ignore[arg-type]
    assert value(yaml_file=yaml_file, env=env, flags=flags) == loaded(
        EnhancedLockingConfig(**{name: in_flag}), name)  # type: ignore[arg-type]
    assert value(env=env, flags=flags) == value(flags=flags)


# --- invalid values ----------------------------------------------------------------------------

INVALID_BY_KIND: dict[str, list[Any]] = {
    # Booleans are the words true/false only (docs/01-foundation.md): not Go's 1/0/t/f, not
    # YAML 1.1's yes/no/on/off.
    "bool": ["maybe", "yes", "1", "off", "t", 0],
    "choice": ["nope"],
    # Integers are ASCII digits: not 1_000, not 1000.0, not a YAML boolean, not Arabic-Indic.
    "int": ["ten", "1.5", -1, 10_000_001, "1_000", "1000.0", 1000.0, True, "\u0661\u0660"],
    "duration": ["30", "soon", "-5s", "5 minutes", " 30s", "\u0663s"],
    "float": ["lots", 101, -1, 12.345, "1_0", True, "\u0661\u0662"],
    "list": ["no-port", "a:1,b:notaport", "a:1,b..example:1", "a:1," + "b" * 64 + ":1"],
    "map": ["nope", "owner=user:alice", "admin=alice", "locker=robot:x"],
    # Rules: an empty pattern, a limit of 0, an unknown command, not a mapping at all.
    "rules": ['{"freezes": [{"name": "f", "match": {}, "message": "m"}]}',
              '{"concurrency": [{"name": "c", "limit": 0}]}',
              '{"priorityRules": [{"name": "p", "commands": ["deploy"], "priority": "high"}]}',
              "[not, a, mapping",
              # A freeze's time without its offset (RFC 3339 has one): which moment is it?
              '{"freezes": [{"name": "f", "match": {"repo": "a/*"}, "message": "m", '
              '"from": "2026-12-08T00:00:00"}]}'],
}
INVALID_STRINGS: dict[str, list[Any]] = {
    # (a name with an empty label or one longer than 63: no resolver takes it)
    "redis_addr": ["nope", "localhost:", ":6379", "localhost:70000", "a b c:1",
                   "localhost:\uff16\uff13\uff17\uff19", "local\thost:1", "redis..example:1",
                   "r" * 64 + ".example:1"],
    "redis_username": ["u" * 257],
    "redis_key_prefix": ["p" * 129, ""],
    "data_dir": [""],
}


def _invalid_cases() -> list[Any]:
    cases = []
    for setting in SETTINGS:
        values = INVALID_STRINGS.get(setting.field, INVALID_BY_KIND.get(setting.kind, []))
        for value in values:
            for source in SOURCES:
                cases.append(pytest.param(setting, value, source,
                                          id=f"{setting.key}={value!s:.20}-{source}"))
    return cases


@pytest.mark.parametrize(("setting", "value", "source"), _invalid_cases())
def test_each_invalid_value_names_the_setting_its_source_and_the_accepted_form(
    setting: Setting, value: Any, source: str, tmp_path: Path
) -> None:
    companions = COMPANIONS.get(setting.field, {})
    with pytest.raises(ConfigError) as raised:
        load_from(source, tmp_path, {setting.field: value, **companions})
    message = str(raised.value)
    assert "\n" not in message
    assert setting.key in message
    assert setting.form in message
    spelled = {"env": setting.env, "flag": setting.flag, "yaml": setting.key}[source]
    assert spelled in message


def test_every_typed_setting_has_invalid_values_in_the_table() -> None:
    untested = [s.key for s in SETTINGS
                if s.kind != "str" and s.kind not in INVALID_BY_KIND]
    assert not untested, f"add invalid values for {untested} to INVALID_BY_KIND"


def test_an_unknown_enhanced_locking_yaml_key_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("enhanced-locking-enabld: true\n")
    with pytest.raises(ConfigError, match="unknown setting enhanced-locking-enabld"):
        load_config(yaml_file=path, env={})


@pytest.mark.parametrize(("text", "problem"), [
    ("- a\n- b\n", "must be a mapping"),
    ("enhanced-locking-enabled: [true\n", "not valid YAML"),
    # Documents that are not mappings although false-like: not an empty config.
    ("[]\n", "must be a mapping"),
    ("false\n", "must be a mapping"),
    ("0\n", "must be a mapping"),
    ('""\n', "must be a mapping"),
    # PyYAML raised TypeError, ValueError or KeyError for these: a traceback and exit 1.
    ("? [a, b]\n: 1\n", "a key is a list or a mapping \\(a setting's name is text\\) at line 1"),
    ("? {a: 1}\n: 1\n", "a key is a list or a mapping"),
    ("x: &k [1]\n*k : 1\n", "a key is a list or a mapping"),
    ("enhanced-locking-redis-db: !!int 0x1f\n", "an integer is written in decimal digits at line"),
    ("enhanced-locking-enabled: !!bool maybe\n", "a value cannot be read as bool at line 1"),
    ("enhanced-locking-migration-weight: !!float abc\n", "a value cannot be read as float"),
    ("enhanced-locking-replica-id: !!timestamp now\n", "a value cannot be read as timestamp"),
])
def test_a_yaml_file_that_is_not_a_mapping_is_refused(
    text: str, problem: str, tmp_path: Path
) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=problem) as raised:
        load_config(yaml_file=path, env={})
    assert "\n" not in str(raised.value) and str(path) in str(raised.value)


@pytest.mark.parametrize("text", ["", "# nothing set here\n", "~\n"])
def test_an_empty_yaml_file_sets_nothing(text: str, tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    assert load_config(yaml_file=path, env={}) == EnhancedLockingConfig()


def test_yaml_nested_too_deeply_is_one_line(tmp_path: Path) -> None:
    # As many levels as Python's recursion limit allows calls: each level of YAML is at least
    # one call deep in the parser, so this is too deep whatever the limit (5,000 levels took
    # twice the time: PyYAML's scanner looks at every level still open for each token).
    depth = sys.getrecursionlimit()
    deep = "[" * depth + "]" * depth
    path = tmp_path / "config.yaml"
    path.write_text("enhanced-locking-policies: " + deep + "\n")
    with pytest.raises(ConfigError, match="nested too deeply") as raised:
        load_config(yaml_file=path, env={})
    assert "\n" not in str(raised.value) and str(path) in str(raised.value)
    for source in ({"env": {"ATLANTIS_ENHANCED_LOCKING_POLICIES": deep}},
                   {"flags": {"policies": deep}, "env": {}}):
        with pytest.raises(ConfigError, match="invalid setting enhanced-locking-policies"):
            load_config(**source)  # type: ignore[arg-type]


@pytest.mark.parametrize(("text", "value"), [
    ("010", 10), ("09", 9), ("0", 0), ("-0", 0), ("0100", 100), ("+3", 3),
])
def test_a_yaml_integer_is_decimal_as_in_env_and_flags(
    text: str, value: int, tmp_path: Path
) -> None:
    # YAML 1.1 (PyYAML's default) read 010 as octal 8 and failed on 09 with a traceback.
    path = tmp_path / "config.yaml"
    path.write_text(f"enhanced-locking-redis-db: {text}\n")
    in_yaml = load_config(yaml_file=path, env={}).redis_db
    in_env = load_config(env={"ATLANTIS_ENHANCED_LOCKING_REDIS_DB": text}).redis_db
    in_flag = load_config(flags=_flags({"redis_db": text}), env={}).redis_db
    assert in_yaml == in_env == in_flag == value


def test_policies_from_env_and_flags_are_read_as_the_config_file_is(tmp_path: Path) -> None:
    rules = ('{concurrency: [{name: prod, match: {repo: "acme/*"}, limit: 010}]}')
    path = tmp_path / "config.yaml"
    path.write_text(f"enhanced-locking-policies: {rules}\n")
    from_yaml = load_config(yaml_file=path, env={}).policies
    from_env = load_config(env={"ATLANTIS_ENHANCED_LOCKING_POLICIES": rules}).policies
    from_flag = load_config(flags=_flags({"policies": rules}), env={}).policies
    assert from_yaml == from_env == from_flag
    assert from_env.concurrency[0].limit == 10
    for refused in ("false", "- a\n- b", "{freezes: [], freezes: []}"):
        with pytest.raises(ConfigError, match="invalid setting enhanced-locking-policies"):
            load_config(env={"ATLANTIS_ENHANCED_LOCKING_POLICIES": refused})


def test_a_yaml_syntax_error_is_one_line_saying_where(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("enhanced-locking-enabled: true\nenhanced-locking-backend: [redis\nx: 1\n")
    with pytest.raises(ConfigError) as raised:
        load_config(yaml_file=path, env={})
    message = str(raised.value)
    assert "\n" not in message
    assert str(path) in message and "not valid YAML" in message and "line 3" in message


def test_a_config_file_that_is_not_utf8_is_refused_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_bytes(b"enhanced-locking-enabled: true\nenhanced-locking-replica-id: \xff\xfe\n")
    with pytest.raises(ConfigError, match="is not UTF-8") as raised:
        load_config(yaml_file=path, env={})
    assert "\n" not in str(raised.value) and str(path) in str(raised.value)


def test_a_config_file_that_is_not_utf8_past_8_kib_names_the_files_offset(
    tmp_path: Path,
) -> None:
    # A text reader decodes in 8 KiB chunks: the offset was the chunk's (838 here).
    path = tmp_path / "config.yaml"
    path.write_bytes(b"#" + b"x" * 9000 + b"\nenhanced-locking-enabled: tr\xffue\n")
    with pytest.raises(ConfigError) as raised:
        load_config(yaml_file=path, env={})
    assert str(raised.value) == (f"config file {path} is not UTF-8 text (byte 0xff at offset "
                                 f"{1 + 9000 + 1 + len('enhanced-locking-enabled: tr')})")


def test_a_yaml_key_is_read_in_any_case_as_atlantis_reads_it(tmp_path: Path) -> None:
    # Atlantis's viper reads keys case-insensitively: Enhanced-Locking-Enabled was left to
    # Atlantis as not ours, and enhanced locking stayed off.
    path = tmp_path / "config.yaml"
    path.write_text("Enhanced-Locking-Enabled: true\nDATA-DIR: /srv/atlantis\n")
    config = load_config(yaml_file=path, env={})
    assert config.enabled and config.data_dir == "/srv/atlantis"
    path.write_text("Enhanced-Locking-Enabld: true\n")
    with pytest.raises(ConfigError, match="unknown setting Enhanced-Locking-Enabld in"):
        load_config(yaml_file=path, env={})
    path.write_text("enhanced-locking-enabled: true\nEnhanced-Locking-Enabled: false\n")
    with pytest.raises(ConfigError) as raised:
        load_config(yaml_file=path, env={})
    assert str(raised.value) == (
        f"config file {path} is not valid YAML: enhanced-locking-enabled is set twice "
        "(enhanced-locking-enabled and Enhanced-Locking-Enabled)")


def test_a_setting_given_twice_in_yaml_is_refused_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("enhanced-locking-enabled: true\nport: 4141\nenhanced-locking-enabled: false\n")
    with pytest.raises(ConfigError) as raised:
        load_config(yaml_file=path, env={})
    message = str(raised.value)
    assert "enhanced-locking-enabled is set twice (lines 1 and 3)" in message
    assert "\n" not in message


@pytest.mark.parametrize(("text", "value"), [
    ("enhanced-locking-enabled: yes\n", "'yes'"),
    ("enhanced-locking-metrics: off\n", "'off'"),
    ("enhanced-locking-max-queue-size: 1_000\n", "'1_000'"),
    ("enhanced-locking-max-queue-size: 1000.0\n", "1000.0"),
    ("enhanced-locking-max-queue-size: true\n", "True"),
    ("enhanced-locking-redis-db: 1:30\n", "'1:30'"),
])
def test_yaml_values_are_read_as_yaml_1_2_not_1_1(text: str, value: str, tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as raised:
        load_config(yaml_file=path, env={})
    assert f"got {value};" in str(raised.value)


@pytest.mark.parametrize("word", ["true", "True", "TRUE", "false", "False", "FALSE"])
def test_booleans_take_the_words_atlantis_flags_take(word: str, tmp_path: Path) -> None:
    expected = word.lower() == "true"
    assert load_config(env={"ATLANTIS_ENHANCED_LOCKING_ENABLED": word}).enabled is expected
    path = tmp_path / "config.yaml"
    path.write_text(f"enhanced-locking-enabled: {word}\n")
    assert load_config(yaml_file=path, env={}).enabled is expected


def test_a_quoted_yaml_value_is_read_as_its_text(tmp_path: Path) -> None:
    # As an env var or flag is (and as Atlantis's viper takes quoted numbers): the text is then
    # held to the same rules (docs/01-foundation.md, "How values are written").
    path = tmp_path / "config.yaml"
    path.write_text('enhanced-locking-redis-db: "12"\nenhanced-locking-enabled: "true"\n'
                    "enhanced-locking-default-timeout: '45s'\n")
    config = load_config(yaml_file=path, env={})
    assert (config.redis_db, config.enabled, config.default_timeout) == (
        12, True, timedelta(seconds=45))
    path.write_text('enhanced-locking-max-queue-size: "1_000"\n')
    with pytest.raises(ConfigError, match="got '1_000';"):
        load_config(yaml_file=path, env={})


def test_a_missing_yaml_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(yaml_file=tmp_path / "absent.yaml", env={})


# --- cross-field rules -------------------------------------------------------------------------

@pytest.mark.parametrize(("values", "names"), [
    ({"default_timeout": "10m"}, ["max-timeout", "default-timeout"]),
    ({"max_timeout": "10s"}, ["max-timeout", "default-timeout"]),
    ({"redis_tls_cert_file": "c.pem"}, ["redis-tls-cert-file", "redis-tls-key-file"]),
    ({"etcd_tls_cert_file": "c.pem"}, ["etcd-tls-cert-file", "etcd-tls-key-file"]),
    ({"redis_tls_key_file": "k.pem"}, ["redis-tls-cert-file", "redis-tls-key-file"]),
    ({"redis_sentinel_addrs": "s:26379"}, ["redis-sentinel-addrs", "redis-sentinel-master"]),
    ({"redis_sentinel_master": "m"}, ["redis-sentinel-addrs", "redis-sentinel-master"]),
    ({"redis_cluster": "true", "legacy_backend": "redis"}, ["redis-cluster", "legacy-backend"]),
    ({"redis_cluster": "true", "redis_db": "2"}, ["redis-cluster", "redis-db"]),
    ({"redis_cluster": "true", "redis_sentinel_addrs": "s:26379",
      "redis_sentinel_master": "m"}, ["redis-cluster", "redis-sentinel-addrs"]),
], ids=lambda v: str(v))
def test_settings_that_go_together_are_checked_together(
    values: dict[str, str], names: list[str]
) -> None:
    env = {BY_FIELD[name].env: value for name, value in values.items()}
    with pytest.raises(ConfigError) as raised:
        load_config(env=env)
    for name in names:
        assert f"enhanced-locking-{name}" in str(raised.value)


@pytest.mark.parametrize(("field", "value", "problem"), [
    # Waits are counted in whole ms: a threshold under 1ms was 0, and aging silently off.
    ("starvation_threshold", "999us", "must be at least 1ms"),
    ("starvation_threshold", "0", "must be at least 1ms"),
    # A lease under half a microsecond rounded to 0: no lease at all.
    ("lock_ttl", "400ns", "rounds to no lease at all"),
    ("lock_ttl", "0.0000004s", "rounds to no lease at all"),
    # Leases are counted in whole ms: one under 1ms was 1ms on Redis, shorter elsewhere.
    ("lock_ttl", "400us", "is under 1ms"),
    ("lock_ttl", "999us", "write 0 for none, or at least 1ms"),
    ("lock_ttl", "600ns", "is under 1ms"),  # (taken as 1µs before)
])
def test_a_duration_that_reads_as_off_is_refused_naming_the_setting(
    field: str, value: str, problem: str
) -> None:
    with pytest.raises(ConfigError) as raised:
        load_config(env={BY_FIELD[field].env: value})
    assert BY_FIELD[field].env in str(raised.value) or BY_FIELD[field].key in str(raised.value)
    assert problem in str(raised.value)


@pytest.mark.parametrize(("field", "value", "micros"), [
    ("starvation_threshold", "1ms", 1000), ("lock_ttl", "0", 0), ("lock_ttl", "0s", 0),
    ("lock_ttl", "1ms", 1000), ("lock_ttl", "1001us", 1001),
])
def test_the_durations_next_to_those_refused_are_taken(field: str, value: str,
                                                        micros: int) -> None:
    config = load_config(env={BY_FIELD[field].env: value})
    assert getattr(config, field) // timedelta(microseconds=1) == micros


def test_max_timeout_may_equal_default_timeout() -> None:
    config = load_config(env={"ATLANTIS_ENHANCED_LOCKING_DEFAULT_TIMEOUT": "5m"})
    assert config.max_timeout == config.default_timeout


# --- secrets -----------------------------------------------------------------------------------

@pytest.mark.parametrize("source", SOURCES)
def test_the_redis_password_is_never_shown(source: str, tmp_path: Path) -> None:
    secret = "hunter2-s3cret"
    config = load_from(source, tmp_path, {"redis_password": secret})
    assert config.redis_password.get_secret_value() == secret
    for text in (repr(config), str(config), config.model_dump_json(), str(config.masked())):
        assert secret not in text
    assert config.masked()["enhanced-locking-redis-password"] == "********"
    assert EnhancedLockingConfig().masked()["enhanced-locking-redis-password"] == ""


def test_a_config_error_never_shows_the_password(tmp_path: Path) -> None:
    secret = "hunter2-s3cret"
    with pytest.raises(ConfigError) as raised:
        load_config(env={"ATLANTIS_ENHANCED_LOCKING_REDIS_PASSWORD": secret,
                         "ATLANTIS_ENHANCED_LOCKING_REDIS_DB": "x"})
    assert secret not in str(raised.value)


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize(("field", "address"), [
    ("redis_addr", "redis://:hunter2-s3cret@redis.example:6379/0"),
    ("redis_addr", "atlantis:hunter2-s3cret@redis.example:6379"),
    ("etcd_endpoints", "https://root:hunter2/s3cret@etcd.example:2379"),
    ("redis_sentinel_addrs", "redis://:hunter2-s3cret@sentinel.example:26379"),
])
def test_a_password_in_an_address_is_never_shown(
    field: str, address: str, source: str, tmp_path: Path
) -> None:
    # A URL with credentials given where host:port belongs (a habit from REDIS_URL): the
    # error named the setting and echoed the password.
    setting = BY_FIELD[field]
    value: Any = [address] if setting.kind == "list" else address
    with pytest.raises(ConfigError) as raised:
        load_from(source, tmp_path, {field: value, **COMPANIONS.get(field, {})})
    message = str(raised.value)
    assert "s3cret" not in message and "hunter2" not in message
    assert setting.key in message and "***@" in message
    assert address.rpartition("@")[2] in message


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize(("field", "value", "switch"), [
    ("redis_tls_ca_file", "ca.pem", "redis_tls"),
    ("redis_tls_skip_verify", True, "redis_tls"),
    ("etcd_tls_ca_file", "ca.pem", "etcd_tls"),
])
def test_a_tls_setting_without_its_tls_switch_is_refused(
    field: str, value: Any, switch: str, source: str, tmp_path: Path
) -> None:
    # It was ignored: a plain TCP connection, the password in clear, where TLS was meant (a
    # LockPolicy refuses the same: redis.tls.caSecretRef needs redis.tls.enabled).
    with pytest.raises(ConfigError) as raised:
        load_from(source, tmp_path, {field: value})
    key, switched = BY_FIELD[field].key, BY_FIELD[switch].key
    spelled = {"env": BY_FIELD[field].env, "flag": BY_FIELD[field].flag, "yaml": key}[source]
    message = str(raised.value)
    assert message.startswith(f"invalid configuration: {key} needs {switched} true")
    assert spelled in message and f"{switched} from default" in message
    assert "\n" not in message
    assert getattr(load_from(source, tmp_path, {field: value, switch: True}), field)


async def test_a_cluster_layer_may_turn_tls_off_over_static_tls_files() -> None:
    static = load_config(env={"ATLANTIS_ENHANCED_LOCKING_REDIS_TLS": "true",
                              "ATLANTIS_ENHANCED_LOCKING_REDIS_TLS_CA_FILE": "ca.pem"})
    provider = ConfigProvider(static)
    snapshot = await provider.set_layer("cluster", {"redis_tls": False})
    assert not snapshot.config.redis_tls


# --- derived values ----------------------------------------------------------------------------

def test_the_embedded_store_lives_in_the_data_dir(tmp_path: Path) -> None:
    config = load_config(env={"ATLANTIS_DATA_DIR": str(tmp_path)})
    assert config.data_path == tmp_path / "enhanced-locking.db"
    assert EnhancedLockingConfig().data_path == (
        Path("~/.atlantis").expanduser() / "enhanced-locking.db")


@pytest.mark.parametrize(("settings_", "weight"), [
    ({}, 0.0),
    ({"migration_weight": 40}, 0.0),
    ({"enabled": True}, 100.0),
    ({"enabled": True, "migration_weight": 40}, 40.0),
    ({"enabled": True, "migration_weight": 0}, 0.0),
])
def test_the_effective_weight_is_zero_when_disabled_and_all_when_no_migration(
    settings_: dict[str, Any], weight: float
) -> None:
    assert EnhancedLockingConfig(**settings_).effective_weight == weight


def test_durations_in_the_config_are_printed_the_go_way() -> None:
    config = load_config(env={"ATLANTIS_ENHANCED_LOCKING_MAX_TIMEOUT": "1h30m",
                              "ATLANTIS_ENHANCED_LOCKING_RETRY_BACKOFF": "1500ms"})
    shown = config.masked()
    assert shown["enhanced-locking-max-timeout"] == "1h30m"
    assert shown["enhanced-locking-retry-backoff"] == "1.5s"
    assert parse_duration(shown["enhanced-locking-max-timeout"]) == config.max_timeout
