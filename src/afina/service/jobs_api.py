"""The OpenAI-compatible fine-tuning API: /v1/files and /v1/fine_tuning/jobs, behind API keys.

    app = create_jobs_app(open_store(), JobsSettings(workers=1))    # `afina server`
    uvicorn.run(app, host="127.0.0.1", port=8000)

    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="afn-...")   # `afina keys create`
    file = client.files.create(file=open("tickets.jsonl", "rb"), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model="default", training_file=file.id)

Every route but /health needs `Authorization: Bearer KEY` (401 for a missing, unknown, expired or
revoked key). A key acts as its user, in the project the request names with `OpenAI-Project`
(the `openai` client's `project=`; default: `default`); the store checks the user's role there for
each action and answers 403 `permission_denied` otherwise, and a file or job of another project is
not found (404). afina's extensions reach the registry, users and the audit trail with the same
checks: GET/DELETE /v1/models/{name:version}, POST /v1/models/{model}/promote, POST /v1/users,
GET /v1/audit. Files are validated as they
arrive (400 with afina's validation code; 413 past the size limit); a job is checked whole before it
is queued (400 naming the `param`). Unknown ids are 404. Errors have OpenAI's shape, and none leaves
a row or a file behind. The `afina` field of a job is afina's extension: a whole run config in, the
run, its gate decision and the registered model out.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from afina.errors import AfinaError
from afina.jobs.files import delete_stored_bytes, read_stored_bytes, save_upload
from afina.jobs.keys import hash_api_key
from afina.jobs.multipart import StreamedForm
from afina.jobs.run_config import (
    check_hyperparameters,
    check_method,
    check_suffix,
    job_config,
)
from afina.security.encryption import use_encryption
from afina.security.permissions import authorize
from afina.service.schemas import ApiError
from afina.store import Job, JobEvent, Model, Store, StoredFile
from afina.store.principals import DEFAULT_PROJECT, Principal, check_project_name

NOT_FOUND_CODES = ("file_not_found", "job_not_found", "model_not_found", "user_not_found")
HYPERPARAMETER_NAMES = ("n_epochs", "batch_size", "learning_rate_multiplier")


@dataclass(frozen=True)
class JobsSettings:
    """Limits and local workers of the jobs service."""

    max_upload_bytes: int = 256 * 2**20  # larger uploads get 413
    workers: int = 0  # worker threads in the server process; 0: workers run elsewhere (`afina worker`)
    lease_seconds: float = 60.0
    poll_seconds: float = 2.0
    check_seconds: float = 1.0  # how often a running job's worker looks whether it was cancelled


def create_jobs_app(store: Store, settings: JobsSettings = JobsSettings(), run_job=None) -> FastAPI:
    """The jobs API on `store`, with `settings.workers` local workers (running `run_job`, by default
    afina's workflow) started and stopped with the app. The app hands down what protects the data:
    the store checks each key's user with `afina.security.permissions.authorize`, and the process
    keeps files encrypted at rest when a master key is set (`afina.security.encryption`)."""
    store.check_permissions_with(authorize)
    use_encryption()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        from afina.jobs.worker import run_workflow_job, start_worker_threads

        stop = threading.Event()
        threads = start_worker_threads(store, settings.workers, stop, run_job=run_job or run_workflow_job,
                                       lease_seconds=settings.lease_seconds, poll_seconds=settings.poll_seconds,
                                       check_seconds=settings.check_seconds)
        yield
        stop.set()
        for thread in threads:
            thread.join(timeout=1)  # a job still running keeps its lease until it expires; another worker resumes it

    app = FastAPI(title="afina jobs", lifespan=lifespan)
    app.state.store, app.state.settings = store, settings

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(AfinaError)
    async def afina_error(request: Request, error: AfinaError) -> JSONResponse:
        api = api_error_of(error)
        return JSONResponse(api.body(), status_code=api.status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        body = ApiError(error.status_code, str(error.detail), code="not_found" if error.status_code == 404 else None)
        return JSONResponse(body.body(), status_code=error.status_code)

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok"}

    app.include_router(router)
    return app


def api_error_of(error: AfinaError) -> ApiError:
    """An AfinaError as the API answers it: 403 for a refused permission, 404 for an unknown id, 413
    for too large, else 400."""
    if error.code == "permission_denied":
        return ApiError(403, error.message, type="permission_error", code=error.code)
    status = 404 if error.code in NOT_FOUND_CODES else 413 if error.code == "file_too_large" else 400
    message = error.message + (f" ({error.hint})" if error.hint else "")
    param = error.location if status == 400 else None
    return ApiError(status, message, param=param, code=error.code)


def get_store(request: Request) -> Store:
    return request.app.state.store


def require_key(request: Request, store: Annotated[Store, Depends(get_store)]) -> Principal:
    """Who calls: the user of the live API key in `Authorization: Bearer KEY`; 401 without one. An
    expired or revoked key gets the same answer as an unknown one."""
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    found = store.principal_for_key(hash_api_key(key.strip())) if scheme.lower() == "bearer" and key.strip() else None
    if found is None:
        raise ApiError(401, "a valid API key is required: Authorization: Bearer KEY (`afina keys create NAME`)",
                       type="invalid_request_error", code="invalid_api_key")
    return found[1]


def request_project(request: Request) -> str:
    """The project the request acts in: the `OpenAI-Project` header, else the default project."""
    project = request.headers.get("openai-project") or DEFAULT_PROJECT
    try:
        return check_project_name(project)
    except AfinaError as error:
        raise ApiError(400, error.message, param="OpenAI-Project", code=error.code) from None


router = APIRouter(prefix="/v1", dependencies=[Depends(require_key)])
StoreDep = Annotated[Store, Depends(get_store)]
Caller = Annotated[Principal, Depends(require_key)]  # computed once per request, with the router's
Project = Annotated[str, Depends(request_project)]


# files

@router.post("/files")
async def upload_file(request: Request, store: StoreDep, caller: Caller, project: Project) -> dict:
    store.check_permission(caller, "upload_data", project)  # before reading the body
    settings: JobsSettings = request.app.state.settings
    refuse_larger_than(request, settings.max_upload_bytes + FORM_ROOM)  # a declared length: 413 before reading
    form = StreamedForm(request.headers.get("content-type"), request.stream())
    filename = await form.file_name()  # the form is read up to the file's bytes
    if form.field("purpose") is not None:  # sent before the file, as clients do: checked before its bytes
        check_purpose(form)

    async def file_then_purpose() -> AsyncIterator[bytes]:
        async for chunk in form.file_chunks():  # to disk as they arrive; 413 once past the limit
            yield chunk
        check_purpose(form)  # the whole form is read: before anything is kept

    stored = await save_upload(store, file_then_purpose(), filename=filename, purpose="fine-tune",
                               max_bytes=settings.max_upload_bytes, project=project, by=caller)
    return file_object(stored)


def check_purpose(form: StreamedForm) -> None:
    if form.field("purpose") != "fine-tune":
        raise ApiError(400, "purpose must be fine-tune", param="purpose", code="invalid_purpose")


@router.get("/files")
def list_files(store: StoreDep, caller: Caller, project: Project, purpose: str | None = None) -> dict:
    files = store.list_files(purpose, project=project, by=caller)
    return {"object": "list", "data": [file_object(f) for f in files], "has_more": False}


@router.get("/files/{file_id}")
def get_file(file_id: str, store: StoreDep, caller: Caller, project: Project) -> dict:
    return file_object(store.get_file(file_id, project=project, by=caller))


@router.delete("/files/{file_id}")
def delete_file(file_id: str, store: StoreDep, caller: Caller, project: Project) -> dict:
    stored, still_needed = store.delete_file(file_id, project=project, by=caller)
    if not still_needed:
        delete_stored_bytes(stored.path)
    return {"id": stored.id, "object": "file", "deleted": True}


@router.get("/files/{file_id}/content")
def file_content(file_id: str, store: StoreDep, caller: Caller, project: Project) -> Response:
    stored = store.get_file(file_id, project=project, by=caller)
    return Response(read_stored_bytes(stored.path), media_type="application/octet-stream",
                    headers={"Content-Disposition": f'attachment; filename="{stored.filename}"'})


# jobs

@router.post("/fine_tuning/jobs")
async def create_job(request: Request, store: StoreDep, caller: Caller, project: Project) -> dict:
    store.check_permission(caller, "start_job", project)  # before the request is checked
    body = await read_json(request)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "model is required: a base model (a Hugging Face id, a local directory, or default)",
                       param="model", code="invalid_model")
    if model.startswith(("/", ".", "~")) and not Path(model).expanduser().is_dir():
        raise ApiError(400, f"no model directory {model!r} on the server", param="model", code="model_not_found")
    files = {}
    for param in ("training_file", "validation_file"):
        file_id = body.get(param)
        if file_id is None and param == "validation_file":
            continue
        if not isinstance(file_id, str):
            raise ApiError(400, f"{param} must be a file id", param=param, code="invalid_file")
        try:
            files[param] = store.get_file(file_id, project=project)
        except AfinaError:
            raise ApiError(400, f"no file {file_id!r}", param=param, code="file_not_found") from None
    hyperparameters = check_hyperparameters(body.get("hyperparameters"))
    method = check_method(body.get("method"))
    afina = body.get("afina") or {}
    if not isinstance(afina, dict):
        raise ApiError(400, "afina must be a run config (an object)", param="afina", code="invalid_config")
    if method is not None:
        hyperparameters |= method[method["type"]]["hyperparameters"]
        if method["type"] == "dpo":
            afina = {**afina, "objective": {**(afina.get("objective") or {}), "name": "dpo"}}
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ApiError(400, "seed must be an integer", param="seed", code="invalid_seed")
    metadata = body.get("metadata")
    if metadata is not None and not (isinstance(metadata, dict) and len(metadata) <= 16
                                     and all(isinstance(v, str) for v in metadata.values())):
        raise ApiError(400, "metadata must be at most 16 string values", param="metadata", code="invalid_metadata")
    suffix = check_suffix(body.get("suffix"))
    validation = files.get("validation_file")
    job_config(model=model, training_path=files["training_file"].path,  # the whole run config, checked now
               validation_path=validation.path if validation else None, hyperparameters=hyperparameters,
               suffix=suffix, seed=seed, afina=afina)
    job = store.create_job(model=model, training_file=files["training_file"].id,
                           validation_file=validation.id if validation else None, hyperparameters=hyperparameters,
                           suffix=suffix, seed=seed, metadata=metadata, afina_config=afina, project=project,
                           by=caller)
    return job_object(job)


@router.get("/fine_tuning/jobs")
def list_jobs(store: StoreDep, caller: Caller, project: Project, after: str | None = None, limit: int = 20) -> dict:
    if not 1 <= limit <= 100:
        raise ApiError(400, "limit must be 1 to 100", param="limit")
    jobs, more = store.list_jobs(after=after, limit=limit, project=project, by=caller)
    return {"object": "list", "data": [job_object(job) for job in jobs], "has_more": more}


@router.get("/fine_tuning/jobs/{job_id}")
def get_job(job_id: str, store: StoreDep, caller: Caller, project: Project) -> dict:
    return job_object(store.get_job(job_id, project=project, by=caller))


@router.post("/fine_tuning/jobs/{job_id}/cancel")
def cancel_job(job_id: str, store: StoreDep, caller: Caller, project: Project) -> dict:
    return job_object(store.cancel_job(job_id, project=project, by=caller))


@router.get("/fine_tuning/jobs/{job_id}/events")
def job_events(job_id: str, store: StoreDep, caller: Caller, project: Project, after: str | None = None,
               limit: int = 20) -> dict:
    cursor = None
    if after is not None:
        try:
            cursor = int(after.removeprefix("ftevent-"))
        except ValueError:
            raise ApiError(400, "after must be an event id", param="after") from None
    events = store.job_events(job_id, after=cursor, limit=limit + 1, newest_first=True, project=project, by=caller)
    return {"object": "list", "data": [event_object(e) for e in events[:limit]], "has_more": len(events) > limit}


@router.get("/fine_tuning/jobs/{job_id}/checkpoints")
def job_checkpoints(job_id: str, store: StoreDep, caller: Caller, project: Project, after: str | None = None,
                    limit: int = 10) -> dict:
    job = store.get_job(job_id, project=project, by=caller)
    checkpoints = checkpoint_objects(job, store)
    if after is not None:
        ids = [c["id"] for c in checkpoints]
        checkpoints = checkpoints[ids.index(after) + 1:] if after in ids else []
    return {"object": "list", "data": checkpoints[:limit], "has_more": len(checkpoints) > limit,
            "first_id": checkpoints[0]["id"] if checkpoints else None,
            "last_id": checkpoints[min(limit, len(checkpoints)) - 1]["id"] if checkpoints else None}


# afina's extensions: the registry, users and the audit trail (the registry belongs to the default project)

@router.get("/models/{model}")
def get_model(model: str, store: StoreDep, caller: Caller) -> dict:
    return model_object(store.get_model(model, by=caller))


@router.delete("/models/{model}")
def delete_model(model: str, store: StoreDep, caller: Caller) -> dict:
    from afina.pipeline.run_dir import delete_trained

    deleted = store.delete_model(model, by=caller)
    if deleted.artifacts.get("run_dir"):
        delete_trained(Path(deleted.artifacts["run_dir"]))
    return {"id": deleted.ref, "object": "model", "deleted": True}


@router.post("/models/{model}/promote")
async def promote_model(model: str, request: Request, store: StoreDep, caller: Caller) -> dict:
    alias = (await read_json(request)).get("alias")
    if not isinstance(alias, str):
        raise ApiError(400, "alias is required, e.g. production", param="alias", code="bad_alias")
    name, _, version = model.partition(":")
    return model_object(store.promote(name, alias, int(version) if version.isdigit() else None, by=caller))


@router.post("/users")
async def add_user(request: Request, store: StoreDep, caller: Caller) -> dict:
    body = await read_json(request)
    name, project, role = body.get("name"), body.get("project") or DEFAULT_PROJECT, body.get("role")
    if not all(isinstance(v, str) for v in (name, project, role)):
        raise ApiError(400, "name, role and project (default: default) are strings", param="name")
    if name in {u.name for u in store.list_users(by=caller)}:
        user = store.grant(name, project, role, by=caller)
    else:
        user = store.add_user(name, project=project, role=role, by=caller)
    return {"object": "user", "name": user.name, "roles": user.roles}


@router.get("/audit")
def audit_events(store: StoreDep, caller: Caller, user: str | None = None, action: str | None = None,
                 resource: str | None = None, limit: int = 100) -> dict:
    events = store.events(actor=user, action=action, resource=resource, by=caller)[-limit:]
    return {"object": "list", "data": [{"id": e.id, "created_at": timestamp(e.created_at), "actor": e.actor,
                                        "kind": e.kind, "message": e.message, "details": e.details, "hash": e.hash}
                                       for e in events]}


# request bodies


FORM_ROOM = 64 * 2**10  # an upload's form beside the file's bytes: boundaries, headers, purpose


def refuse_larger_than(request: Request, limit: int) -> None:
    """413 for a request whose declared length (Content-Length) is past `limit`, before reading it."""
    if int(request.headers.get("content-length") or 0) > limit:
        raise ApiError(413, f"the request is larger than {limit} bytes", code="file_too_large")


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it passes `limit` (before it is all read)."""
    refuse_larger_than(request, limit)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"the request is larger than {limit} bytes", code="file_too_large")
    return bytes(body)


async def read_json(request: Request) -> dict[str, Any]:
    import json

    raw = await read_body(request, 4 * 2**20)
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        raise ApiError(400, "the request body is not valid JSON", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    return body


# response objects


def timestamp(value) -> int | None:
    return None if value is None else int(value.timestamp())


def file_object(stored: StoredFile) -> dict:
    return {"id": stored.id, "object": "file", "bytes": stored.bytes, "created_at": timestamp(stored.created_at),
            "filename": stored.filename, "purpose": stored.purpose, "status": "processed", "status_details": None}


def job_object(job: Job) -> dict:
    hyperparameters = {name: job.hyperparameters.get(name, "auto") for name in HYPERPARAMETER_NAMES}
    method_type = "dpo" if (job.afina_config.get("objective") or {}).get("name") == "dpo" else "supervised"
    return {
        "id": job.id, "object": "fine_tuning.job", "created_at": timestamp(job.created_at), "error": job.error,
        "fine_tuned_model": job.fine_tuned_model, "finished_at": timestamp(job.finished_at),
        "hyperparameters": hyperparameters, "model": job.model, "organization_id": "afina", "result_files": [],
        "seed": job.seed if job.seed is not None else 0, "status": job.status, "trained_tokens": None,
        "training_file": job.training_file, "validation_file": job.validation_file, "integrations": [],
        "estimated_finish": None, "metadata": job.metadata, "user_provided_suffix": job.suffix,
        "method": {"type": method_type, method_type: {"hyperparameters": hyperparameters}},
        "afina": {"run_id": job.run_id, "worker": job.worker, "attempts": job.attempts, **(job.result or {})},
    }


def model_object(model: Model) -> dict:
    return {"id": model.ref, "object": "model", "created": timestamp(model.created_at), "owned_by": "afina",
            "aliases": list(model.aliases), "status": model.status, "gate": model.gate}


def event_object(event: JobEvent) -> dict:
    return {"id": f"ftevent-{event.id}", "object": "fine_tuning.job.event", "created_at": timestamp(event.created_at),
            "level": event.level, "message": event.message, "type": "message", "data": {}}


def checkpoint_objects(job: Job, store: Store) -> list[dict]:
    """The run's checkpoints on disk, newest first."""
    from afina.training.checkpoints import list_checkpoints

    if job.run_id is None:
        return []
    checkpoints_dir = Path(store.get_run(job.run_id).run_dir) / "checkpoints"
    found = list_checkpoints(checkpoints_dir) if checkpoints_dir.is_dir() else []
    objects = []
    for path in reversed(found):
        step = int(path.name.removeprefix("step-"))
        objects.append({"id": f"ftckpt-{job.id.removeprefix('ftjob-')}-{step}", "object": "fine_tuning.job.checkpoint",
                        "created_at": int(path.stat().st_mtime), "fine_tuning_job_id": job.id, "step_number": step,
                        "fine_tuned_model_checkpoint": f"{job.fine_tuned_model or job.model}:ckpt-step-{step}",
                        "metrics": {}})
    return objects
