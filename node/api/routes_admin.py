"""/api/v1/users and /api/v1/tokens (admin): the same service functions as `pacsnode users|tokens`."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response

from node.api.auth import Principal, Role, actor, admin, client_address, config_of, require_role
from node.api.schemas import PasswordIn, TokenCreated, TokenIn, TokenOut, UserIn, UserOut
from node.services import users

router = APIRouter(tags=["users"])
AdminRead = Annotated[Principal, Depends(require_role(Role.ADMIN))]
Admin = Annotated[Principal, Depends(admin)]


@router.get("/users", response_model=list[UserOut])
def list_users(request: Request, who: AdminRead) -> Any:
    return users.list_users(config_of(request))


@router.post("/users", response_model=UserOut, status_code=201)
def add_user(request: Request, body: UserIn, who: Admin) -> Any:
    cfg = config_of(request)
    users.add_user(cfg, body.name, body.role, body.password, actor=actor(request, who),
                   address=client_address(request))
    return next(u for u in users.list_users(cfg) if u["name"] == body.name)


@router.put("/users/{name}/password", status_code=204)
def set_password(request: Request, name: str, body: PasswordIn, who: Admin) -> Response:
    """A new password; the user's browser sessions end (their tokens stay valid)."""
    users.set_password(config_of(request), name, body.password, actor=actor(request, who),
                       address=client_address(request))
    return Response(status_code=204)


@router.delete("/users/{name}", status_code=204)
def remove_user(request: Request, name: str, who: Admin) -> Response:
    """Remove a user; their tokens and sessions are refused at once. The last admin stays."""
    users.remove_user(config_of(request), name, actor=actor(request, who), address=client_address(request))
    return Response(status_code=204)


@router.get("/tokens", response_model=list[TokenOut])
def list_tokens(request: Request, who: AdminRead) -> Any:
    return users.list_tokens(config_of(request))


@router.post("/tokens", response_model=TokenCreated, status_code=201)
def create_token(request: Request, body: TokenIn, who: Admin) -> Any:
    """A bearer token for a user, shown once in this answer (only its hash is stored)."""
    token_id, token = users.create_token(config_of(request), body.user, body.expires_days,
                                         actor=actor(request, who), address=client_address(request))
    return {"id": token_id, "user": body.user, "token": token}


@router.delete("/tokens/{token_id}", status_code=204)
def revoke_token(request: Request, token_id: int, who: Admin) -> Response:
    """Revoke a token: the next request that carries it is refused."""
    users.revoke_token(config_of(request), token_id, actor=actor(request, who), address=client_address(request))
    return Response(status_code=204)
