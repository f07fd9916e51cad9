"""`pacsnode users` and `pacsnode tokens`: the same service functions as the API, audited with
the operating system user and host."""

from __future__ import annotations

import getpass
import io
from pathlib import Path

import pytest
import yaml
from sqlalchemy import select

from node.cli import main
from node.config import load_config
from node.db.models import Event
from node.db.session import session_scope
from node.services import users


def test_users_add_passwd_remove_and_tokens_create_revoke(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"database": {"url": f"sqlite:///{tmp_path / 'db.sqlite'}"},
                                    "storage": {"path": str(tmp_path / "spool")}}))
    cfg = load_config(path)

    def run(*args: str, stdin: str = "") -> int:
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
        return main(["--config", str(path), *args])

    assert run("users", "add", "alice", "--role", "operator", "--password-stdin", stdin="a long passphrase\n") == 0
    assert run("users", "add", "bob", "--role", "viewer", "--password-stdin", stdin="short\n") == 1
    assert "password: at least 12 characters" in capsys.readouterr().err
    assert run("users", "passwd", "alice", "--password-stdin", stdin="another passphrase\n") == 0
    assert users.check_password(cfg, "alice", "another passphrase")
    assert run("tokens", "create", "--user", "alice", "--expires", "30") == 0
    token = capsys.readouterr().out.strip().splitlines()[-1]
    assert users.principal_for_token(cfg, token) is not None
    assert run("tokens", "revoke", "1") == 0
    assert users.principal_for_token(cfg, token) is None
    assert run("users", "remove", "alice") == 0
    assert run("users", "remove", "alice") == 1
    with session_scope(cfg.database.url) as s:
        events = [(e.kind, e.actor) for e in s.scalars(select(Event).order_by(Event.id))]
    who = events[0][1]
    assert who is not None and who.startswith(f"{getpass.getuser()}@")
    assert events == [("user_add", who), ("user_password", who), ("token_create", who), ("token_revoke", who),
                      ("user_remove", who)]
