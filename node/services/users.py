"""Users, API tokens, browser sessions and the login rate limit, all in the database (several
API processes share them; nothing lives in one process's memory)."""

from __future__ import annotations

import enum
import hashlib
import logging
import os
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import delete, func, select

from node.config import Config
from node.db.models import ApiToken, Event, LoginAttempt, User, WebSession, utcnow
from node.db.session import session_scope
from node.identifiers import _private_write
from node.services.errors import Invalid, NotFound

log = logging.getLogger(__name__)
_hasher = PasswordHasher()
TOKEN_PREFIX = "pn_"
FIRST_PASSWORD_FILE = "admin-password.txt"


class Role(enum.StrEnum):
    VIEWER = "viewer"
    OPERATOR = "operator"
    ADMIN = "admin"

    @property
    def rank(self) -> int:
        return list(Role).index(self)


@dataclass(frozen=True)
class Principal:
    """Who makes a request: a user, by session cookie or by API token."""

    user_id: int
    name: str
    role: Role
    via: str  # "session" or "token"
    session_id: str | None = None
    csrf: str | None = None

    def can(self, role: Role) -> bool:
        return self.role.rank >= role.rank


class LoginFailed(Exception):
    """Wrong name or password (never says which)."""


class RateLimited(Exception):
    def __init__(self, retry_after: int) -> None:
        super().__init__(f"too many failed logins; try again in {retry_after} s")
        self.retry_after = retry_after


def _sha(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def _check_name(name: str) -> str:
    if not (1 <= len(name) <= 64) or not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise Invalid("name", "1-64 letters, digits, '-', '_' or '.'")
    return name


def _check_password(password: str) -> str:
    if len(password) < 12:
        raise Invalid("password", "at least 12 characters")
    return password


def add_user(config: Config, name: str, role: str, password: str, *, actor: str, address: str | None = None) -> int:
    """Create a user (audited as user_add by `actor`); Invalid names the bad field."""
    _check_name(name)
    try:
        r = Role(role)
    except ValueError as e:
        raise Invalid("role", f"one of {', '.join(Role)}") from e
    _check_password(password)
    with session_scope(config.database.url) as s:
        if s.scalar(select(User.id).where(User.name == name)) is not None:
            raise Invalid("name", f"user {name!r} exists")
        user = User(name=name, role=r.value, password_hash=_hasher.hash(password), created_at=utcnow())
        s.add(user)
        s.flush()
        s.add(_event("user_add", actor, f"{name} ({r.value})", address))
        return user.id


def _event(kind: str, actor: str, detail: str, address: str | None) -> Event:
    return Event(kind=kind, actor=actor[:64], detail=detail, address=(address or "")[:64] or None)


def list_users(config: Config) -> list[dict[str, Any]]:
    with session_scope(config.database.url) as s:
        tokens = dict(s.execute(select(ApiToken.user_id, func.count()).where(ApiToken.revoked_at.is_(None))
                                .group_by(ApiToken.user_id)).tuples().all())
        return [{"id": u.id, "name": u.name, "role": u.role, "created_at": u.created_at.isoformat(),
                 "tokens": tokens.get(u.id, 0)} for u in s.scalars(select(User).order_by(User.name))]


def _user(s: Any, name: str) -> User:
    user = s.scalar(select(User).where(User.name == name))
    if user is None:
        raise NotFound(f"no user {name!r}")
    return user


def remove_user(config: Config, name: str, *, actor: str, address: str | None = None) -> None:
    """Delete a user with their tokens and sessions (they are refused at once). The last admin
    stays: without one, nobody could manage users from the API or the dashboard."""
    with session_scope(config.database.url) as s:
        user = _user(s, name)
        if user.role == Role.ADMIN and s.scalar(select(func.count()).where(User.role == Role.ADMIN.value)) == 1:
            raise Invalid("name", f"{name} is the last admin; add another admin first")
        s.execute(delete(ApiToken).where(ApiToken.user_id == user.id))
        s.execute(delete(WebSession).where(WebSession.user_id == user.id))
        s.delete(user)
        s.add(_event("user_remove", actor, name, address))


def set_password(config: Config, name: str, password: str, *, actor: str, address: str | None = None,
                 keep_session: str | None = None) -> None:
    """Give a user a new password; their other browser sessions end (tokens stay valid)."""
    _check_password(password)
    with session_scope(config.database.url) as s:
        user = _user(s, name)
        user.password_hash = _hasher.hash(password)
        ended = delete(WebSession).where(WebSession.user_id == user.id)
        if keep_session:
            ended = ended.where(WebSession.id != keep_session)
        s.execute(ended)
        s.add(_event("user_password", actor, name, address))


def check_password(config: Config, name: str, password: str) -> bool:
    """Whether `password` is the user's current one (for a change of one's own password)."""
    with session_scope(config.database.url) as s:
        user = s.scalar(select(User).where(User.name == name))
        try:
            return user is not None and _hasher.verify(user.password_hash, password)
        except (VerificationError, InvalidHashError):
            return False


def create_token(config: Config, name: str, expires_days: float | None = None, *, actor: str,
                 address: str | None = None) -> tuple[int, str]:
    """A new API token for user `name`: (id, token). Only its hash is stored; show it once."""
    if expires_days is not None and expires_days <= 0:
        raise Invalid("expires", "a positive number of days")
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    with session_scope(config.database.url) as s:
        user = _user(s, name)
        now = utcnow()
        row = ApiToken(user_id=user.id, token_hash=_sha(token), created_at=now,
                       expires_at=now + timedelta(days=expires_days) if expires_days else None)
        s.add(row)
        s.flush()
        s.add(_event("token_create", actor, f"token {row.id} for {name}", address))
        return row.id, token


def list_tokens(config: Config) -> list[dict[str, Any]]:
    def ts(v: datetime | None) -> str | None:
        return v.isoformat() if v else None

    with session_scope(config.database.url) as s:
        rows = s.execute(select(ApiToken, User.name).join(User).order_by(ApiToken.id)).all()
        return [{"id": t.id, "user": n, "created_at": ts(t.created_at), "expires_at": ts(t.expires_at),
                 "revoked_at": ts(t.revoked_at), "last_used_at": ts(t.last_used_at)} for t, n in rows]


def revoke_token(config: Config, token_id: int, *, actor: str, address: str | None = None) -> None:
    """Revoke a token: the next request that carries it is refused."""
    with session_scope(config.database.url) as s:
        row = s.get(ApiToken, token_id)
        if row is None:
            raise NotFound(f"no token {token_id}")
        row.revoked_at = row.revoked_at or utcnow()
        s.add(_event("token_revoke", actor, f"token {token_id}", address))


def principal_for_token(config: Config, token: str) -> Principal | None:
    """The user a bearer token belongs to, if it is known, unrevoked and unexpired."""
    now = utcnow()
    with session_scope(config.database.url) as s:
        row = s.execute(select(ApiToken, User).join(User).where(ApiToken.token_hash == _sha(token))).first()
        if row is None:
            return None
        t, user = row
        if t.revoked_at is not None or (t.expires_at is not None and t.expires_at <= now):
            return None
        # Coarse, so that every request does not write: a minute is enough for "last used".
        if t.last_used_at is None or now - t.last_used_at > timedelta(minutes=1):
            t.last_used_at = now
        return Principal(user.id, user.name, Role(user.role), "token")


def principal_for_session(config: Config, cookie: str) -> Principal | None:
    with session_scope(config.database.url) as s:
        row = s.execute(select(WebSession, User).join(User).where(WebSession.id == _sha(cookie))).first()
        if row is None:
            return None
        ws, user = row
        if ws.expires_at <= utcnow():
            s.delete(ws)
            return None
        return Principal(user.id, user.name, Role(user.role), "session", ws.id, ws.csrf_token)


def login(config: Config, name: str, password: str, address: str | None) -> tuple[str, Principal]:
    """Check a password under the rate limit; return (cookie value, principal) of a new session."""
    now = utcnow()
    window = now - timedelta(seconds=config.api.login_window_seconds)
    with session_scope(config.database.url) as s:
        s.execute(delete(LoginAttempt).where(LoginAttempt.at < window))
        by_name = s.scalar(select(func.count()).where(LoginAttempt.name == name[:64], LoginAttempt.at >= window)) or 0
        by_addr = s.scalar(select(func.count()).where(LoginAttempt.address == address, LoginAttempt.at >= window)) or 0 if address else 0
    if max(by_name, by_addr) >= config.api.login_attempts:
        raise RateLimited(int(config.api.login_window_seconds))
    with session_scope(config.database.url) as s:
        user = s.scalar(select(User).where(User.name == name))
        try:
            ok = user is not None and _hasher.verify(user.password_hash, password)
        except (VerificationError, InvalidHashError):
            ok = False
        if user is None:
            _hasher.hash(password)  # same time whether or not the name exists
        if not ok or user is None:
            s.add(LoginAttempt(name=name[:64], address=(address or "")[:64] or None, at=now))
            raise_after = True
        else:
            raise_after = False
            cookie = secrets.token_urlsafe(32)
            ws = WebSession(id=_sha(cookie), user_id=user.id, csrf_token=secrets.token_urlsafe(24), created_at=now,
                            expires_at=now + timedelta(hours=config.api.session_hours), address=(address or "")[:64] or None)
            s.add(ws)
            s.execute(delete(WebSession).where(WebSession.expires_at < now))
            principal = Principal(user.id, user.name, Role(user.role), "session", ws.id, ws.csrf_token)
    if raise_after:  # after the commit, so the failed attempt counts
        raise LoginFailed("wrong name or password")
    return cookie, principal


def logout(config: Config, session_id: str) -> None:
    with session_scope(config.database.url) as s:
        s.execute(delete(WebSession).where(WebSession.id == session_id))


def ensure_first_admin(config: Config) -> Path | None:
    """With no users at all, create `admin` with a random password written to a 0600 file under
    api.state_dir; return the file's path (the password itself is never logged)."""
    with session_scope(config.database.url) as s:
        if s.scalar(select(func.count()).select_from(User)):
            return None
    password = secrets.token_urlsafe(18)
    path = config.api.state_dir / FIRST_PASSWORD_FILE
    # Written aside first and renamed once the user exists: a process that loses the race to
    # create `admin` must not replace the winner's file.
    tmp = path.with_name(f".{FIRST_PASSWORD_FILE}.{os.getpid()}")
    tmp.unlink(missing_ok=True)
    _private_write(tmp, f"user: admin\npassword: {password}\n")
    try:
        add_user(config, "admin", Role.ADMIN, password, actor="pacsnode (first start)")
    except Invalid:  # another process created it at the same moment: its file wins
        tmp.unlink()
        return None
    os.replace(tmp, path)
    log.warning("created user admin; its password is in %s (change it, then delete the file)", path)
    return path
