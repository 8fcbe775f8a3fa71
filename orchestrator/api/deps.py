"""Typed dependencies: the database session (one transaction per request) and the caller.

A GET (or HEAD) request reads: its session is a read session (`Database.read_session`), which on
SQLite never takes the write lock and is not queued behind this process's writers. Every other
method gets a unit of work that may write.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer, SecurityScopes
from sqlalchemy.ext.asyncio import AsyncSession

from orchestrator.agents.registry import AgentRegistry
from orchestrator.core.auth import Actor, Scope, TokenClaims, verify_access_token
from orchestrator.core.config import Settings
from orchestrator.core.errors import Forbidden, Unauthorized
from orchestrator.core.states import WORKER_LIVE
from orchestrator.db.session import Database
from orchestrator.db.unit_of_work import UnitOfWork, unit_of_work
from orchestrator.jobs import repository as jobs_repo
from orchestrator.jobs.group_commit import SubmitQueue
from orchestrator.workers import repository as workers_repo

# Upper bound of integer query parameters: what every database column and OFFSET accepts.
MAX_QUERY_INT = 2**31 - 1

bearer_scheme = HTTPBearer(
    scheme_name="BearerAuth",
    bearerFormat="JWT",
    description="A JWT from `create_access_token` or `orchestrator token`; scopes listed per operation.",
    auto_error=False,
)


# Every dependency is `async def`: FastAPI runs a plain `def` dependency in a worker thread, a
# thread hop per dependency per request for what is an attribute lookup.


async def get_settings_dep(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def get_agents(request: Request) -> AgentRegistry:
    agents: AgentRegistry = request.app.state.agents
    return agents


READ_METHODS = frozenset({"GET", "HEAD"})


async def get_session(request: Request) -> AsyncIterator[AsyncSession]:
    """The request's transaction: committed when the endpoint returns, before the response is sent."""
    database: Database = request.app.state.db
    opened = database.read_session() if request.method in READ_METHODS else database.session()
    async with opened as session:
        yield session


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
AgentsDep = Annotated[AgentRegistry, Depends(get_agents)]
SessionDep = Annotated[AsyncSession, Depends(get_session, scope="function")]


async def get_unit_of_work(session: SessionDep) -> UnitOfWork:
    """The request's session (one per request: authentication reads through it too), typed as the
    unit of work it is for a method that writes: committed, its events written and its topics
    announced, when the endpoint returns, before the response is sent."""
    return unit_of_work(session)


UnitOfWorkDep = Annotated[UnitOfWork, Depends(get_unit_of_work)]


async def authenticate(
    security_scopes: SecurityScopes,
    session: SessionDep,
    settings: SettingsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
) -> Actor:
    claims = _verified_claims(security_scopes, settings, credentials)
    if claims.worker_id is None:
        return Actor(name=f"user:{claims.user_id}", user_id=claims.user_id)
    return await _worker_actor(session, claims)


async def authenticate_sessionless(
    security_scopes: SecurityScopes,
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
) -> Actor:
    """`authenticate` for a route that opens no session per request (the submit: its writes
    are group-committed, jobs/group_commit.py): a worker's token is checked in a read session
    of its own, a user's needs none. No dependency but the token's: each costs CPU."""
    claims = _verified_claims(security_scopes, request.app.state.settings, credentials)
    if claims.worker_id is None:
        return Actor(name=f"user:{claims.user_id}", user_id=claims.user_id)
    database: Database = request.app.state.db
    async with database.read_session() as session:
        return await _worker_actor(session, claims)


def _verified_claims(
    security_scopes: SecurityScopes, settings: Settings, credentials: HTTPAuthorizationCredentials | None
) -> TokenClaims:
    if credentials is None:
        raise Unauthorized("Not authenticated: send 'Authorization: Bearer <token>'")
    claims = verify_access_token(credentials.credentials, settings)
    missing = [scope for scope in security_scopes.scopes if scope not in claims.scopes]
    if missing:
        raise Forbidden(f"Insufficient scope: this operation requires {', '.join(missing)}")
    return claims


async def _worker_actor(session: AsyncSession, claims: TokenClaims) -> Actor:
    assert claims.worker_id is not None  # a worker's token
    worker = await workers_repo.get_worker(session, claims.worker_id)
    if worker is None or worker.status not in WORKER_LIVE or worker.job_id != claims.job_id:
        raise Unauthorized(f"Token of worker {claims.worker_id} is no longer valid: the worker has ended")
    job = await jobs_repo.get_job(session, worker.job_id)
    if job is None:
        raise Unauthorized(f"Token of worker {claims.worker_id} names an unknown job")
    return Actor(
        name=f"worker:{worker.id}",
        user_id=claims.user_id,
        worker_id=worker.id,
        worker_job_id=job.id,
        subtree_path=job.path,
    )


async def get_submit_queue(request: Request) -> SubmitQueue:
    """This process's queue of submits for group commit, made on first use (per Database: an
    app's lifespan makes a new one each time it starts)."""
    state = request.app.state
    database: Database = state.db
    queue: SubmitQueue | None = getattr(state, "submit_queue", None)
    if queue is None or queue.database is not database:
        agents: AgentRegistry = state.agents
        queue = state.submit_queue = SubmitQueue(
            database, state.settings, agents.validate, agents.validate_limits
        )
    return queue


SubmitQueueDep = Annotated[SubmitQueue, Depends(get_submit_queue)]
SupervisorRead = Annotated[Actor, Security(authenticate, scopes=[Scope.SUPERVISOR_READ])]
SupervisorWrite = Annotated[Actor, Security(authenticate, scopes=[Scope.SUPERVISOR_WRITE])]
JobsRead = Annotated[Actor, Security(authenticate, scopes=[Scope.JOBS_READ])]
JobsWrite = Annotated[Actor, Security(authenticate, scopes=[Scope.JOBS_WRITE])]
# jobs:write without a session of the request's own (the submit).
JobsSubmitter = Annotated[Actor, Security(authenticate_sessionless, scopes=[Scope.JOBS_WRITE])]
ResourcesRead = Annotated[Actor, Security(authenticate, scopes=[Scope.RESOURCES_READ])]
ResourcesWrite = Annotated[Actor, Security(authenticate, scopes=[Scope.RESOURCES_WRITE])]
