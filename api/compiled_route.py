"""A FastAPI route class whose dependencies and query parameters are solved by a plan made once.

A route is declared the FastAPI way (typed `Query` parameters with patterns, `Depends` for the
login and the parameters), and the OpenAPI spec comes from that declaration as usual. Per
request, FastAPI's own solver looks at every parameter's annotation and aliases again and makes
a result object per dependency; on the usage API's hot route that cost more than the Redis
round trip (docs/usage-api.md, Performance). `CompiledRoute` walks
the declared dependencies once, when the route is built, and keeps for each what a request needs:
the callable, the query parameters with their pydantic validators, where the `Request` goes.

Per request it does what FastAPI's solver does, in the same order: sub-dependencies first (one
call per dependency and request, as FastAPI caches them), then the dependant's own query
parameters, each validated by the field's own pydantic validator (the same errors, so the same
`RequestValidationError`); a dependency whose parameters fail is not called, and the errors of
all are raised together. The endpoint must return a `Response`.

What the plan does not cover (path, header, cookie or body parameters, sequences, aliases,
generator or plain-`def` dependencies, security scopes, background tasks, a `Response`
parameter) makes the route use FastAPI's own handler, as it does while
`app.dependency_overrides` is set; `compiled` says which one a route uses.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from enum import Enum
from types import NoneType, UnionType
from typing import Any

from fastapi import Request, Response, routing
from fastapi.dependencies.models import Dependant
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute

Handler = Callable[[Request], Coroutine[Any, Any, Response]]

# Query parameter types a plan takes (alone or `| None`): one value each, no sequences.
_SCALARS = (str, int, float, bool)


class NotCompilable(Exception):
    """The dependant uses something the plan does not cover (the reason is the message)."""


@dataclass(frozen=True)
class _Param:
    name: str
    loc: tuple[str, str]
    required: bool
    default: Any
    validate: Callable[..., tuple[Any, list[dict[str, Any]]]]


@dataclass(frozen=True)
class _Step:
    """One dependant: its sub-dependencies, its query parameters, its callable."""

    call: Callable[..., Any]
    name: str | None
    use_cache: bool
    subs: tuple[_Step, ...]
    params: tuple[_Param, ...]
    request_name: str | None


def _scalar(annotation: Any) -> bool:
    if isinstance(annotation, type):
        return issubclass(annotation, (*_SCALARS, Enum))
    if typing.get_origin(annotation) in (typing.Union, UnionType):
        args = [a for a in typing.get_args(annotation) if a is not NoneType]
        return len(args) == 1 and _scalar(args[0])
    return False


def _param(field: Any) -> _Param:
    info = field.field_info
    if info.validation_alias is not None or field.alias != field.name:
        raise NotCompilable(f"query parameter {field.name!r} has an alias")
    if not _scalar(info.annotation):
        raise NotCompilable(f"query parameter {field.name!r} is not a single str, number or enum")
    default = None if info.is_required() else info.get_default(call_default_factory=True)
    if not isinstance(default, (NoneType, *_SCALARS, Enum)) or info.validate_default:
        raise NotCompilable(f"query parameter {field.name!r} has a default that is validated")
    return _Param(field.name, ("query", field.name), info.is_required(), default, field.validate)


def _step(dependant: Dependant, top: bool = False) -> _Step:
    call = dependant.call
    if call is None or not inspect.iscoroutinefunction(call):
        raise NotCompilable(f"{call!r} is not an `async def` function")
    others = {
        "path parameters": dependant.path_params,
        "header parameters": dependant.header_params,
        "cookie parameters": dependant.cookie_params,
        "a body": dependant.body_params,
        "a websocket": dependant.websocket_param_name,
        "a connection parameter": dependant.http_connection_param_name,
        "a response parameter": dependant.response_param_name,
        "background tasks": dependant.background_tasks_param_name,
        "security scopes": dependant.security_scopes_param_name or dependant.own_oauth_scopes,
        "a concurrency limit": dependant.concurrency,
    }
    for what, used in others.items():
        if used:
            raise NotCompilable(f"{call.__name__} takes {what}")
    try:
        returns = typing.get_type_hints(call).get("return") if top else Response
    except (NameError, TypeError) as exc:
        raise NotCompilable(f"{call.__name__}'s annotations: {exc}") from None
    if returns is not Response:
        raise NotCompilable(f"{call.__name__} is not declared to return a Response")
    return _Step(
        call=call,
        name=dependant.name,
        use_cache=dependant.use_cache,
        subs=tuple(_step(sub) for sub in dependant.dependencies),
        params=tuple(_param(f) for f in dependant.query_params),
        request_name=dependant.request_param_name,
    )


async def _solve(
    step: _Step, request: Request, cache: dict[Any, Any], errors: list[dict[str, Any]]
) -> tuple[bool, dict[str, Any]]:
    """The arguments of `step.call` (False when one of them failed, its errors added)."""
    values: dict[str, Any] = {}
    ok = True
    for sub in step.subs:
        sub_ok, sub_values = await _solve(sub, request, cache, errors)
        if not sub_ok:
            ok = False
            continue
        if sub.use_cache and sub.call in cache:
            solved = cache[sub.call]
        else:
            solved = await sub.call(**sub_values)
            cache.setdefault(sub.call, solved)
        if sub.name is not None:
            values[sub.name] = solved
    if step.params:
        query = request.query_params
        for p in step.params:
            value = query.get(p.name)
            if value is None:
                if p.required:
                    errors.append(
                        {"type": "missing", "loc": p.loc, "msg": "Field required", "input": None}
                    )
                    ok = False
                else:
                    values[p.name] = p.default
                continue
            checked, errs = p.validate(value, values, loc=p.loc)
            if errs:
                errors.extend(errs)
                ok = False
            else:
                values[p.name] = checked
    if step.request_name is not None:
        values[step.request_name] = request
    return ok, values


class CompiledRoute(APIRoute):
    """An `APIRoute` served by a plan of its declared dependencies (see the module's doc)."""

    compiled: bool = False
    not_compiled_because: str = ""

    def get_route_handler(self) -> Handler:
        fastapi_handler = super().get_route_handler()
        route = self._effective_route()
        try:
            plan = _step(route.dependant, top=True)
        except NotCompilable as exc:
            self.compiled, self.not_compiled_because = False, str(exc)
            return fastapi_handler
        self.compiled = True
        overrides_provider = route.dependency_overrides_provider
        endpoint = plan.call

        async def handler(request: Request) -> Response:
            if overrides_provider is not None and overrides_provider.dependency_overrides:
                return await fastapi_handler(request)
            errors: list[dict[str, Any]] = []
            ok, values = await _solve(plan, request, {}, errors)
            if not ok:
                raise RequestValidationError(errors)
            response: Response = await endpoint(**values)
            return response

        return handler

    def _effective_route(self) -> Any:
        """The route as included (with the including router's or app's dependencies), which
        FastAPI names in a context variable while it builds an included route's handler
        (fastapi.routing, pinned in constraints.txt); else this route itself."""
        context = routing._effective_route_context_var.get()
        if context is not None and context.original_route is self:
            return context
        return self
