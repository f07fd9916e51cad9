"""/api/v1/auth: JSON login/logout (the web pages use node.api.auth.login/logout directly)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Request, Response

from node.api import auth
from node.api.schemas import LoginIn, Me

router = APIRouter(prefix="/auth", tags=["auth"])


@router.post("/login", response_model=Me)
async def login(request: Request, response: Response, body: LoginIn) -> Any:
    try:
        p = await auth.login(request, response, body.name, body.password)
    except auth.RateLimited as e:
        raise HTTPException(429, str(e), headers={"Retry-After": str(e.retry_after)}) from e
    except auth.LoginFailed as e:
        raise HTTPException(401, str(e)) from e
    return {"name": p.name, "role": p.role.value, "csrf_token": p.csrf}


@router.post("/logout", status_code=204)
async def logout(request: Request, response: Response,
                 who: Annotated[auth.Principal, Depends(auth.csrf_protect)]) -> Response:
    await auth.logout(request, response, who)
    response.status_code = 204
    return response


@router.get("/me", response_model=Me)
async def me(who: Annotated[auth.Principal, Depends(auth.current_user)]) -> Any:
    return {"name": who.name, "role": who.role.value, "csrf_token": who.csrf}
