"""The one config loader: defaults, a file, env overrides, and refusals that
name the key at fault."""

from __future__ import annotations

from pathlib import Path

import pytest

from triplane.runtime.config import ConfigError, load_config, with_overrides


def test_defaults_load_with_the_stack_section() -> None:
    config = load_config(environ={})
    assert config.money.listen == "127.0.0.1:50061"
    assert config.policy.listen == "127.0.0.1:50062"
    assert config.ai.listen == "127.0.0.1:50063"
    assert config.gateway.listen == "127.0.0.1:50051"
    assert config.nats.url == ""
    assert [p.name for p in config.stack.planes] == [
        "money",
        "policy",
        "ai",
        "gateway",
        "console",
        "sandbox_bank",
    ]
    # The console and the sandbox bank start with `triplane up` or when named,
    # never by default.
    assert [p.name for p in config.stack.planes if p.optional] == ["console", "sandbox_bank"]
    assert config.stack.stop_timeout_s > config.runtime.shutdown_grace_s


def test_env_overrides_nested_keys_with_yaml_values() -> None:
    config = load_config(
        environ={
            "TRIPLANE__MONEY__GROUP_COMMIT__MAX_WAIT_MS": "2.5",
            "TRIPLANE__STACK__START_TIMEOUT_S": "7",
            "TRIPLANE__STACK__PLANES": "[{name: money, module: money_plane}]",
            "TRIPLANE__RUNTIME__LOG_FORMAT": "text",
        }
    )
    assert config.money.group_commit.max_wait_ms == 2.5
    assert config.stack.start_timeout_s == 7.0
    assert [(p.name, p.module) for p in config.stack.planes] == [("money", "money_plane")]
    assert config.runtime.log_format == "text"


def test_shortcut_variables() -> None:
    config = load_config(
        environ={
            "NATS_URL": "nats://nats.example:4222",
            "TRIPLANE_STATE_DIR": "/var/lib/triplane",
            "TRIPLANE_MONEY_DSN": "host=db user=triplane",
        }
    )
    assert config.nats.url == "nats://nats.example:4222"
    assert config.runtime.state_dir == "/var/lib/triplane"
    assert config.money.store.backend == "postgres"
    assert config.money.store.postgres_dsn == "host=db user=triplane"


def test_unknown_env_key_is_refused_naming_it() -> None:
    with pytest.raises(ConfigError, match=r"money\.group_commit\.max_wiat_ms"):
        load_config(environ={"TRIPLANE__MONEY__GROUP_COMMIT__MAX_WIAT_MS": "1"})


def test_unknown_section_is_refused_naming_it() -> None:
    with pytest.raises(ConfigError, match="'moeny'"):
        load_config(environ={"TRIPLANE__MOENY__LISTEN": "127.0.0.1:1"})


def test_wrong_type_is_refused_naming_the_key() -> None:
    with pytest.raises(ConfigError, match=r"stack\.start_timeout_s"):
        load_config(environ={"TRIPLANE__STACK__START_TIMEOUT_S": "soon"})


def test_unknown_plane_field_is_refused() -> None:
    with pytest.raises(ConfigError, match="command"):
        load_config(environ={"TRIPLANE__STACK__PLANES": "[{name: x, module: y, command: z}]"})


def test_file_then_env_later_wins(tmp_path: Path) -> None:
    path = tmp_path / "triplane.yaml"
    path.write_text(
        "money:\n  listen: 0.0.0.0:7000\n  budget_ms: 900\nstack:\n  stop_timeout_s: 30\n"
    )
    config = load_config(
        environ={"TRIPLANE_CONFIG": str(path), "TRIPLANE__MONEY__LISTEN": "0.0.0.0:7001"}
    )
    assert config.money.listen == "0.0.0.0:7001"
    assert config.money.budget_ms == 900
    assert config.stack.stop_timeout_s == 30


def test_unknown_key_in_file_is_refused_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "triplane.yaml"
    path.write_text("stack:\n  start_timeout: 3\n")
    with pytest.raises(ConfigError, match=r"stack\.start_timeout'"):
        load_config(path, environ={})


def test_invalid_values_are_refused() -> None:
    with pytest.raises(ConfigError, match="postgres_dsn"):
        load_config(environ={"TRIPLANE__MONEY__STORE__BACKEND": "postgres"})
    with pytest.raises(ConfigError, match=r"ai\.breaker\.failure_rate"):
        load_config(environ={"TRIPLANE__AI__BREAKER__FAILURE_RATE": "1.5"})
    with pytest.raises(ConfigError, match=r"ai\.breaker"):
        load_config(environ={"TRIPLANE__AI__BREAKER__WINDOW_S": "0"})


def test_with_overrides_keeps_the_rest() -> None:
    config = load_config(environ={})
    changed = with_overrides(config, {"money": {"listen": "127.0.0.1:1"}})
    assert changed.money.listen == "127.0.0.1:1"
    assert changed.stack == config.stack
    with pytest.raises(ConfigError, match="no_such"):
        with_overrides(config, {"stack": {"no_such": 1}})


def test_an_empty_default_mapping_takes_the_users_keys(tmp_path: Path) -> None:
    from triplane.runtime import config as config_module

    base = {"levers": {}, "money": {"listen": "x"}}
    merged = config_module._merge(base, {"levers": {"offer_a": 1.5}})
    assert merged["levers"] == {"offer_a": 1.5}
    with pytest.raises(config_module.ConfigError, match=r"unknown config key 'money\.bogus'"):
        config_module._merge(base, {"money": {"bogus": 1}})
