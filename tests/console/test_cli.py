"""`triplane console add-user` / `set-password`: local accounts with argon2
hashes in the console's store; the password only from a file or the terminal."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from console.auth import verify_password
from console.store import ConsoleStore
from triplane.runtime.config import load_config
from triplane_tools.cli import main


@pytest.fixture
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in [n for n in os.environ if n.startswith("TRIPLANE")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("TRIPLANE_STATE_DIR", str(tmp_path))
    return tmp_path


def store_of(state: Path) -> ConsoleStore:
    return ConsoleStore.from_config(load_config(environ={"TRIPLANE_STATE_DIR": str(state)}))


def test_add_user_stores_an_argon2_hash(state: Path) -> None:
    secret = state / "pw"
    secret.write_text("a long enough password\n")
    args = ["console", "add-user", "rita", "--role", "reviewer", "--role", "auditor"]
    assert main([*args, "--password-file", str(secret)]) == 0
    store = store_of(state)
    user = store.user("rita")
    assert user is not None and user.roles == ("reviewer", "auditor")
    assert user.password_hash.startswith("$argon2id$")
    assert "a long enough password" not in user.password_hash
    assert verify_password(user.password_hash, "a long enough password")
    assert main([*args, "--password-file", str(secret)]) == 1  # taken
    secret.write_text("another long password\n")
    assert main(["console", "set-password", "rita", "--password-file", str(secret)]) == 0
    changed = store.user("rita")
    assert changed is not None and verify_password(changed.password_hash, "another long password")
    assert main(["console", "set-password", "nobody", "--password-file", str(secret)]) == 1
    store.close()


def test_short_passwords_and_bad_names_are_refused(state: Path) -> None:
    secret = state / "pw"
    secret.write_text("short\n")
    base = ["console", "add-user", "rita", "--role", "reviewer", "--password-file", str(secret)]
    assert main(base) == 2
    secret.write_text("a long enough password\n")
    assert (
        main(["console", "add-user", "a,b", "--role", "reviewer", "--password-file", str(secret)])
        == 2
    )
    with pytest.raises(SystemExit):
        main(["console", "add-user", "rita", "--role", "root", "--password-file", str(secret)])
    store = store_of(state)
    assert store.user("rita") is None and store.user("a,b") is None
    store.close()
