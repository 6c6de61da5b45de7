"""The HTTP face of the endpoint: a FastAPI app as the Serve ingress (OpenAPI docs at ``/docs``).

Routes (version 1):

* ``POST /v1/enhance?model=NAME&outscale=X`` — the image file as the raw body, or as the ``file`` part of a
  multipart form (whose ``model``/``outscale`` fields, if any, win over the query). Answers the enhanced file in the
  input's form (PNG/JPEG/TIFF keep bit depth and channels, DICOM in gives a derived DICOM object) with headers
  ``X-Medsr-Model``, ``X-Medsr-Model-Sha256``, ``X-Medsr-Scale``, ``X-Medsr-Engine-Revision``,
  ``X-Medsr-Precision``, ``X-Medsr-Consistency-Psnr-Db`` (and ``X-Medsr-Sampling`` for an ``ldm`` model: the
  sampler, steps and seed that drew the answer, compact JSON).
* ``GET /v1/models`` — the models the caller may use, their hashes, scales and engine settings; ``GET /healthz`` —
  ``ok`` when every model deployment answers (the one route open without a credential); ``GET /docs`` and
  ``GET /openapi.json`` — the API's description.

Authentication (``serve.auth``, :mod:`medsr_dist.serve.auth`): every route but ``/healthz`` depends on
:func:`authenticated` — a bearer token (``Authorization: Bearer ...``) checked as the mode says, then the caller's
``serve.rate_limit`` bucket. 401 (with ``WWW-Authenticate: Bearer``), 403 and 429 (with ``Retry-After``) answer a
generic text only; the log has the reason. Every request is logged with the caller's subject (never a token), the
route, the model, the item (the first 16 hex digits of the body's sha256, which the answer's provenance holds in
full) and the status: the audit trail.

Status codes (a JSON body ``{"detail": reason}``; reasons never quote header values nor patient identifiers):
400 unreadable image (any malformed header or file: never a 503 "retry") or parameter (``outscale`` outside
(0, ``serve.max_outscale``]), 401/403/429 (above), 404 unknown model, 408 past ``serve.request_timeout_s``
(Serve's proxy), 413 body over ``serve.max_body_bytes`` (not read further: raw and multipart bodies are counted as
they stream) or image over the pixel limits or ``serve.max_input_bytes`` (header probed, not decoded), 415 not an
image format read here / a DICOM object without an image, 422 a header whose probe took longer than
``serve.probe_timeout_s`` (the probe is stopped) or crashed its probe process, 503 with ``Retry-After`` when a queue is full (``serve.max_queued_requests``) or a model
has no replica, 500 only for a failure of the model itself.

The header probe runs in the ingress's probe processes (:class:`~medsr_dist.serve.admission.ProbePool`,
``serve.probe_workers`` of ``serve.probe_memory_mb`` each), neither on its event loop nor under its GIL, so a file
that is slow or costly to probe never delays another request (nor ``/healthz``); decoding and inference run in the
model replica's threads.
"""
# no `from __future__ import annotations`: FastAPI reads the routes' annotations at runtime through Serve's class wrapper

import asyncio
import hashlib
import logging
import math
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from ray import serve
from ray.exceptions import RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from starlette.formparsers import MultiPartParser

from medsr_dist.serve.auth import AuthError, Caller, RateLimiter, bearer_token, build_authenticator
from medsr_dist.serve.admission import ProbePool, RequestError

log = logging.getLogger(__name__)

api = FastAPI(
    title="medsr-dist super-resolution",
    version="1",
    description="Enhance medical images (PNG, JPEG, TIFF, DICOM) with a super-resolution model. Outputs are "
    "enhancements, not new acquisitions: every response carries the model, its sha256, the scale, the engine "
    "revision and the consistency score.",
    docs_url=None, redoc_url=None, openapi_url=None,  # served by the ingress below, behind authentication
)


def _error(status: int, reason: str, retry_after_s: float | None = None) -> JSONResponse:
    headers = {"Retry-After": str(max(0, math.ceil(retry_after_s)))} if retry_after_s is not None else None
    return JSONResponse({"detail": reason}, status_code=status, headers=headers)


@api.exception_handler(RequestValidationError)
async def _bad_parameter(request: Request, exc: RequestValidationError) -> JSONResponse:
    """A query parameter of the wrong type is a 400 naming it (FastAPI's default is 422)."""
    text = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:]) or 'request'}: {e['msg']}" for e in exc.errors())
    return _error(400, text)


def _audit(caller: str, route: str, status: int, model: str = "-", item: str = "-", note: str = "") -> None:
    log.info("audit subject=%s route=%s model=%s item=%s status=%d%s", caller, route, model, item, status,
             f" reason={note}" if note else "")


async def authenticated(request: Request) -> Caller:
    """FastAPI dependency of every route but ``/healthz``: the caller, or 401/429 (generic text; the log has why)."""
    ingress = serve.get_replica_context().servable_object
    return await ingress.authenticate(request)


async def _counted(stream, limit: int):
    """``stream``'s chunks, refusing (413) once more than ``limit`` bytes came."""
    size = 0
    async for chunk in stream:
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"body exceeds serve.max_body_bytes {limit:,}; not read further")
        yield chunk


# Everything the routes use is defined above this line: @serve.ingress freezes (cloudpickles) the app now.
@serve.ingress(api)
class Ingress:
    """Ingress deployment class: parses, limits and probes requests, routes them to one model's deployment."""

    def __init__(self, models: dict[str, Any], catalogue: dict[str, dict], default_model: str, limits: dict,
                 retry_after_s: float, auth: dict | None = None, rate_limit: dict | None = None):
        """
        Args:
            models: model name -> DeploymentHandle of its :class:`~medsr_dist.serve.model.SRModel` deployment.
            catalogue: model name -> what ``/v1/models`` says before asking the deployments (scale, sha256, ...).
            default_model: used when a request names none.
            limits: ``max_body_bytes``, ``max_input_pixels``, ``max_output_pixels`` and optionally
                ``max_input_bytes``, ``max_outscale``, ``probe_timeout_s``, ``probe_workers``, ``probe_memory_mb``.
            retry_after_s: Retry-After of 503 answers.
            auth / rate_limit: ``serve.auth`` / ``serve.rate_limit`` as dicts (default: none / no limit).
        """
        self.models, self.catalogue, self.default_model = models, catalogue, default_model
        self.limits, self.retry_after_s = dict(limits), float(retry_after_s)
        self.auth = build_authenticator(auth or {})
        self.rate = RateLimiter(rate_limit or {})
        self.probes = ProbePool(int(self.limits.get("probe_workers", 2)),
                                int(self.limits.get("probe_memory_mb", 2048)) << 20)

    async def authenticate(self, request: Request) -> Caller:
        """The caller of ``request`` (see :func:`authenticated`); raises HTTPException 401/429."""
        token = bearer_token(request.headers.get("authorization"))
        route, caller = request.url.path, None
        try:
            if self.auth.mode == "oidc":  # may fetch the issuer's keys: never on the event loop
                caller = await asyncio.to_thread(self.auth.authenticate, token)
            else:
                caller = self.auth.authenticate(token)
            if self.auth.mode == "none" and request.client is not None:
                caller = Caller(f"anonymous@{request.client.host}", caller.models)
            self.rate.take(caller.subject)
        except AuthError as exc:
            _audit(caller.subject if caller else "-", route, exc.status, note=exc.detail)
            raise HTTPException(exc.status, exc.public, headers=exc.headers()) from None
        return caller

    @api.get("/openapi.json", include_in_schema=False)
    async def openapi(self, request: Request, caller: Caller = Depends(authenticated)) -> JSONResponse:
        _audit(caller.subject, "/openapi.json", 200)
        return JSONResponse(request.app.openapi())

    @api.get("/docs", include_in_schema=False)
    async def docs(self, request: Request, caller: Caller = Depends(authenticated)) -> HTMLResponse:
        _audit(caller.subject, "/docs", 200)
        root = request.scope.get("root_path", "").rstrip("/")
        return get_swagger_ui_html(openapi_url=f"{root}/openapi.json", title=api.title)

    @api.get("/healthz", response_class=PlainTextResponse, summary="Liveness: every model deployment answers")
    async def healthz(self) -> Response:
        bad = []
        for name, handle in self.models.items():
            try:
                await handle.info.remote()
            except Exception as exc:  # noqa: BLE001 - reported, not raised
                bad.append(f"{name}: {type(exc).__name__}")
        if bad:
            return PlainTextResponse("unavailable: " + "; ".join(bad), status_code=503)
        return PlainTextResponse("ok")

    @api.get("/v1/models", summary="Models served, with hash, scale and engine settings")
    async def list_models(self, caller: Caller = Depends(authenticated)) -> dict:
        out = []
        _audit(caller.subject, "/v1/models", 200)
        for name, handle in self.models.items():
            if not caller.may_use(name):
                continue
            entry = {"name": name, **self.catalogue[name], "default": name == self.default_model}
            try:
                entry.update(await handle.info.remote())
            except Exception as exc:  # noqa: BLE001
                entry.update(healthy=False, error=f"{type(exc).__name__}")
            entry["name"] = name
            out.append(entry)
        return {"models": out}

    @api.post(
        "/v1/enhance",
        summary="Enhance one image file (raw body or multipart 'file'); the answer is the file in the input's form",
        responses={200: {"content": {"image/png": {}, "image/tiff": {}, "image/jpeg": {}, "application/dicom": {}}},
                   400: {}, 401: {}, 403: {}, 404: {}, 408: {}, 413: {}, 415: {}, 422: {}, 429: {}, 503: {}},
        response_class=Response,
    )
    async def enhance(
        self,
        request: Request,
        model: str | None = Query(None, description="Model name (GET /v1/models); empty: the default model"),
        outscale: float | None = Query(None, description="Final scale (Lanczos after the model); empty: the model's"),
        caller: Caller = Depends(authenticated),
    ) -> Response:
        answer, model, item = await self._enhance(request, model, outscale, caller)
        _audit(caller.subject, "/v1/enhance", answer.status_code, model or "-", item)
        return answer

    async def _enhance(self, request: Request, model: str | None, outscale: float | None,
                       caller: Caller) -> tuple[Response, str | None, str]:
        """The answer of ``POST /v1/enhance``, the model asked for and the item id (for the audit log)."""
        item = "-"
        try:
            data, fields = await self._read(request)
        except RequestError as exc:
            return _error(exc.status, exc.reason), model, item
        item = hashlib.sha256(data).hexdigest()[:16]
        model = fields.get("model") or model or self.default_model
        if "outscale" in fields:
            try:
                outscale = float(fields["outscale"])
            except ValueError:
                return _error(400, f"outscale: not a number ({fields['outscale'][:20]!r})"), model, item
        top = float(self.limits.get("max_outscale", math.inf))
        if outscale is not None and not (math.isfinite(outscale) and 0 < outscale <= top):
            return _error(400, f"outscale must be a number in (0, {top:g}] (serve.max_outscale), got "
                               f"{outscale:.6g}"), model, item
        if not caller.may_use(model):  # before saying whether the model exists
            return JSONResponse({"detail": AuthError.PUBLIC[403]}, status_code=403), model, item
        if model not in self.models:
            return _error(404, f"unknown model {model[:64]!r}; served: "
                               f"{sorted(m for m in self.models if caller.may_use(m))}"), model, item
        scale = float(outscale or self.catalogue[model]["scale"])
        try:  # header only, in the probe processes: refuse before shipping the body to a replica
            await self.probes.check(data, scale, self.limits, self.limits.get("probe_timeout_s"))
        except RequestError as exc:
            return _error(exc.status, exc.reason), model, item
        try:
            answer = await self.models[model].enhance.remote(data, outscale)
        except BackPressureError:
            return _error(503, f"model {model} is at capacity (serve.max_queued_requests); retry later",
                          self.retry_after_s), model, item
        except DeploymentUnavailableError:
            return _error(503, f"model {model} has no running replica; retry later", self.retry_after_s), model, item
        except RayTaskError as exc:  # the model method raised: retrying the same request would fail again
            log.warning("model %s: request failed in the replica (%s)", model, type(exc.cause).__name__)
            return _error(500, f"model {model}: the request failed ({type(exc.cause).__name__})"), model, item
        except Exception as exc:  # noqa: BLE001 - a replica died with the request (RayActorError, ...)
            log.warning("model %s: request lost with its replica (%s)", model, type(exc).__name__)
            return _error(503, f"model {model}: the replica serving this request stopped ({type(exc).__name__}); "
                               f"retry", self.retry_after_s), model, item
        if answer["status"] != 200:
            return _error(answer["status"], answer["reason"],
                          self.retry_after_s if answer["status"] == 503 else None), model, item
        return Response(answer["body"], media_type=answer["media_type"], headers=answer["headers"]), model, item

    async def _read(self, request: Request) -> tuple[bytes, dict[str, str]]:
        """The image bytes (at most ``max_body_bytes``, else 413 before reading further) and form fields."""
        limit = self.limits["max_body_bytes"]
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > limit:
            raise RequestError(413, f"body of {int(length):,} bytes exceeds serve.max_body_bytes {limit:,}; not read")
        kind = request.headers.get("content-type", "")
        if kind.startswith("multipart/form-data"):
            # the parser reads a counted stream: past the limit it stops (413), whatever Content-Length said
            parser = MultiPartParser(request.headers, _counted(request.stream(), limit), max_files=1, max_fields=8,
                                     max_part_size=1024)
            try:
                form = await parser.parse()
            except RequestError:
                raise
            except Exception as exc:  # noqa: BLE001 - malformed multipart
                raise RequestError(400, f"malformed multipart body ({type(exc).__name__})") from None
            try:
                upload = form.get("file")
                if upload is None or isinstance(upload, str):
                    raise RequestError(400, "multipart body without a 'file' part")
                data = await upload.read(limit + 1)
                fields = {k: v for k, v in form.items() if isinstance(v, str) and k in ("model", "outscale")}
            finally:
                await form.close()
        else:
            chunks = []
            async for chunk in _counted(request.stream(), limit):
                chunks.append(chunk)
            data, fields = b"".join(chunks), {}
        if len(data) > limit:
            raise RequestError(413, f"file exceeds serve.max_body_bytes {limit:,}")
        if not data:
            raise RequestError(400, "empty body: send the image file as the body or as multipart 'file'")
        return data, fields

