"""The HTTP face of the endpoint: a FastAPI app as the Serve ingress (OpenAPI docs at ``/docs``).

Routes (version 1):

* ``POST /v1/enhance?model=NAME&outscale=X`` — the image file as the raw body, or as the ``file`` part of a
  multipart form (whose ``model``/``outscale`` fields, if any, win over the query). Answers the enhanced file in the
  input's form (PNG/JPEG/TIFF keep bit depth and channels, DICOM in gives a derived DICOM object) with headers
  ``X-Medsr-Model``, ``X-Medsr-Model-Sha256``, ``X-Medsr-Scale``, ``X-Medsr-Engine-Revision``,
  ``X-Medsr-Precision``, ``X-Medsr-Consistency-Psnr-Db`` (and ``X-Medsr-Sampling`` for an ``ldm`` model: the
  sampler, steps and seed that drew the answer, compact JSON).
* ``GET /v1/models`` — the models, their hashes, scales and engine settings; ``GET /healthz`` — ``ok`` when every
  model deployment answers.

Status codes (a JSON body ``{"detail": reason}``; reasons never quote header values nor patient identifiers):
400 unreadable image or parameter, 404 unknown model, 408 past ``serve.request_timeout_s`` (Serve's proxy),
413 body over ``serve.max_body_bytes`` (not read) or image over the pixel limits (header probed, not decoded),
415 not an image format read here / a DICOM object without an image, 503 with ``Retry-After`` when a queue is
full (``serve.max_queued_requests``) or a model has no replica, 500 only for a failure of the model itself.
"""
# no `from __future__ import annotations`: FastAPI reads the routes' annotations at runtime through Serve's class wrapper

import logging
import math
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from ray import serve
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

from medsr_dist.serve.model import RequestError, check_limits

log = logging.getLogger(__name__)

api = FastAPI(
    title="medsr-dist super-resolution",
    version="1",
    description="Enhance medical images (PNG, JPEG, TIFF, DICOM) with a super-resolution model. Outputs are "
    "enhancements, not new acquisitions: every response carries the model, its sha256, the scale, the engine "
    "revision and the consistency score.",
)


def _error(status: int, reason: str, retry_after_s: float | None = None) -> JSONResponse:
    headers = {"Retry-After": str(max(0, math.ceil(retry_after_s)))} if retry_after_s is not None else None
    return JSONResponse({"detail": reason}, status_code=status, headers=headers)


@api.exception_handler(RequestValidationError)
async def _bad_parameter(request: Request, exc: RequestValidationError) -> JSONResponse:
    """A query parameter of the wrong type is a 400 naming it (FastAPI's default is 422)."""
    text = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:]) or 'request'}: {e['msg']}" for e in exc.errors())
    return _error(400, text)


@serve.ingress(api)
class Ingress:
    """Ingress deployment class: parses, limits and probes requests, routes them to one model's deployment."""

    def __init__(self, models: dict[str, Any], catalogue: dict[str, dict], default_model: str, limits: dict,
                 retry_after_s: float):
        """
        Args:
            models: model name -> DeploymentHandle of its :class:`~medsr_dist.serve.model.SRModel` deployment.
            catalogue: model name -> what ``/v1/models`` says before asking the deployments (scale, sha256, ...).
            default_model: used when a request names none.
            limits: ``max_body_bytes``, ``max_input_pixels``, ``max_output_pixels``.
            retry_after_s: Retry-After of 503 answers.
        """
        self.models, self.catalogue, self.default_model = models, catalogue, default_model
        self.limits, self.retry_after_s = dict(limits), float(retry_after_s)

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
    async def list_models(self) -> dict:
        out = []
        for name, handle in self.models.items():
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
                   400: {}, 404: {}, 408: {}, 413: {}, 415: {}, 503: {}},
        response_class=Response,
    )
    async def enhance(
        self,
        request: Request,
        model: str | None = Query(None, description="Model name (GET /v1/models); empty: the default model"),
        outscale: float | None = Query(None, description="Final scale (Lanczos after the model); empty: the model's"),
    ) -> Response:
        try:
            data, fields = await self._read(request)
        except RequestError as exc:
            return _error(exc.status, exc.reason)
        model = fields.get("model") or model or self.default_model
        if "outscale" in fields:
            try:
                outscale = float(fields["outscale"])
            except ValueError:
                return _error(400, f"outscale: not a number ({fields['outscale'][:20]!r})")
        if outscale is not None and not (math.isfinite(outscale) and outscale > 0):
            return _error(400, f"outscale must be a positive number, got {outscale}")
        if model not in self.models:
            return _error(404, f"unknown model {model[:64]!r}; served: {sorted(self.models)}")
        scale = float(outscale or self.catalogue[model]["scale"])
        try:
            check_limits(data, scale, self.limits)  # header only: refuse before shipping the body to a replica
        except RequestError as exc:
            return _error(exc.status, exc.reason)
        try:
            answer = await self.models[model].enhance.remote(data, outscale)
        except BackPressureError:
            return _error(503, f"model {model} is at capacity (serve.max_queued_requests); retry later",
                          self.retry_after_s)
        except DeploymentUnavailableError:
            return _error(503, f"model {model} has no running replica; retry later", self.retry_after_s)
        except Exception as exc:  # noqa: BLE001 - a replica died with the request (RayActorError, ...)
            log.warning("model %s: request lost with its replica (%s)", model, type(exc).__name__)
            return _error(503, f"model {model}: the replica serving this request stopped ({type(exc).__name__}); "
                               f"retry", self.retry_after_s)
        if answer["status"] != 200:
            return _error(answer["status"], answer["reason"], self.retry_after_s if answer["status"] == 503 else None)
        return Response(answer["body"], media_type=answer["media_type"], headers=answer["headers"])

    async def _read(self, request: Request) -> tuple[bytes, dict[str, str]]:
        """The image bytes (at most ``max_body_bytes``, else 413 before reading further) and form fields."""
        limit = self.limits["max_body_bytes"]
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > limit:
            raise RequestError(413, f"body of {int(length):,} bytes exceeds serve.max_body_bytes {limit:,}; not read")
        kind = request.headers.get("content-type", "")
        if kind.startswith("multipart/form-data"):
            try:
                form = await request.form(max_files=1, max_fields=8, max_part_size=limit)
            except Exception as exc:  # noqa: BLE001 - malformed multipart
                raise RequestError(400, f"malformed multipart body ({type(exc).__name__})") from None
            upload = form.get("file")
            if upload is None or isinstance(upload, str):
                raise RequestError(400, "multipart body without a 'file' part")
            data = await upload.read(limit + 1)
            fields = {k: v for k, v in form.items() if isinstance(v, str) and k in ("model", "outscale")}
        else:
            chunks, size = [], 0
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise RequestError(413, f"body exceeds serve.max_body_bytes {limit:,}; not read further")
                chunks.append(chunk)
            data, fields = b"".join(chunks), {}
        if len(data) > limit:
            raise RequestError(413, f"file exceeds serve.max_body_bytes {limit:,}")
        if not data:
            raise RequestError(400, "empty body: send the image file as the body or as multipart 'file'")
        return data, fields
