"""`crosssim serve`'s HTTP API (FastAPI): DICOM in, class + confidence + alarms out, nothing kept.

- ``POST /v1/predict``: one DICOM file, as multipart field ``file`` or as the raw body with
  ``Content-Type: application/dicom``.
- ``POST /v1/predict/batch``: several multipart ``file`` fields; each file gets its prediction or its error.
- ``GET /v1/model``: classes, model hash, variant, input size, adaptation. ``GET /health``: liveness.

Uploads are read into memory only (never written to disk, never logged) and capped at ``max_upload_bytes``
(413). Bad input is a 4xx whose JSON ``detail`` is one line naming the upload and the problem. With a
token, every route but ``/health`` needs ``Authorization: Bearer <token>`` (401).
"""

from __future__ import annotations

import email.parser
import email.policy
import hmac
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from crosssim.data.dicom import SkippedFile
from crosssim.served_model import ServedModel

BYTES_PER_MB = 1024 * 1024
MAX_BATCH_FILES = 64  # files per /v1/predict/batch request
UPLOAD_FIELD = "file"
DICOM_MEDIA_TYPES = ("application/dicom", "application/octet-stream")
MULTIPART_MEDIA_TYPE = "multipart/form-data"
RAW_UPLOAD_NAME = "upload"  # how errors name a raw-body upload (its file name is not sent)
HTTP_BAD_REQUEST, HTTP_UNAUTHORIZED, HTTP_TOO_LARGE, HTTP_UNSUPPORTED_MEDIA, HTTP_UNPROCESSABLE = (
    400, 401, 413, 415, 422)


def _fail(status: int, detail: str) -> HTTPException:
    return HTTPException(status, " ".join(detail.split()))


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The request body in memory; 413 as soon as it (or its declared length) exceeds ``max_bytes``."""
    limit = f"upload over the {max_bytes / BYTES_PER_MB:g} MB limit (--max-upload-mb)"
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise _fail(HTTP_TOO_LARGE, limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise _fail(HTTP_TOO_LARGE, limit)
        chunks.append(chunk)
    return b"".join(chunks)


def multipart_files(body: bytes, content_type: str) -> list[tuple[str, bytes]]:
    """(file name, bytes) of every ``file`` field of a multipart/form-data body (stdlib MIME parser)."""
    header = b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n"
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(header + body)
    if not message.is_multipart() or message.defects:
        raise _fail(HTTP_BAD_REQUEST, "malformed multipart/form-data body")
    files = []
    for part in message.iter_parts():
        if part.get_param("name", header="content-disposition") == UPLOAD_FIELD:
            files.append((part.get_filename() or UPLOAD_FIELD, part.get_payload(decode=True) or b""))
    if not files:
        raise _fail(HTTP_BAD_REQUEST, f"no multipart field '{UPLOAD_FIELD}' with a DICOM file")
    return files


async def uploaded_files(request: Request, max_bytes: int) -> list[tuple[str, bytes]]:
    """The uploads of a request: multipart ``file`` fields, or the raw body of an application/dicom request."""
    content_type = request.headers.get("content-type", "")
    media_type = content_type.split(";")[0].strip().lower()
    if media_type not in (MULTIPART_MEDIA_TYPE, *DICOM_MEDIA_TYPES):
        raise _fail(HTTP_UNSUPPORTED_MEDIA, f"Content-Type {media_type or '(none)'}: send multipart/form-data "
                                            f"with a '{UPLOAD_FIELD}' field or application/dicom")
    body = await read_body(request, max_bytes)
    if media_type == MULTIPART_MEDIA_TYPE:
        return multipart_files(body, content_type)
    return [(RAW_UPLOAD_NAME, body)]


def _bearer_check(token: str | None) -> Callable[[Request], None]:
    """A FastAPI dependency: 401 unless the request carries ``Authorization: Bearer <token>``."""

    def check(request: Request) -> None:
        if token is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
            raise HTTPException(HTTP_UNAUTHORIZED, "missing or wrong bearer token",
                                headers={"WWW-Authenticate": "Bearer"})

    return check


def create_app(model_dir: str | Path, *, max_upload_bytes: int, int8: bool = False, token: str | None = None,
               threads: int = 0) -> FastAPI:
    """The serving API for ``model_dir`` (written by ``crosssim export``)."""
    model = ServedModel(model_dir, int8=int8, threads=threads)
    # No /docs or /openapi.json: the API is this module's docstring, and nothing answers unauthenticated but health.
    app = FastAPI(title="CrossSim", docs_url=None, redoc_url=None, openapi_url=None)
    authorized = [Depends(_bearer_check(token))]

    def predict_one(name: str, data: bytes) -> dict[str, Any]:
        """One upload → its prediction; SkippedFile → 422 naming the upload."""
        try:
            image = model.preprocess(data, name)
        except SkippedFile as exc:
            raise _fail(HTTP_UNPROCESSABLE, str(exc)) from None
        return {**model.predict(image[None])[0].to_json(), "model": model.model_hash}

    def predict_many(files: list[tuple[str, bytes]]) -> dict[str, Any]:
        """Every upload preprocessed, the readable ones in one forward pass; per-file errors in place."""
        results: list[dict[str, Any]] = []
        images, slots = [], []
        for name, data in files:
            try:
                images.append(model.preprocess(data, name))
                slots.append(len(results))
                results.append({"file": name})
            except SkippedFile as exc:
                results.append({"file": name, "status": HTTP_UNPROCESSABLE, "error": str(exc)})
        if images:
            for slot, prediction in zip(slots, model.predict(np.stack(images))):
                results[slot].update(prediction.to_json())
        return {"predictions": results, "model": model.model_hash}

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        """Anything unforeseen: a one-line 500 (the exception type only; no request content), the server goes on."""
        return JSONResponse({"detail": f"internal error ({type(exc).__name__})"}, status_code=500)

    @app.get("/health")
    def health() -> dict[str, str]:
        """Liveness: open even with a token."""
        return {"status": "ok"}

    @app.get("/v1/model", dependencies=authorized)
    def describe() -> dict[str, Any]:
        """What is served: classes, identity, input size and how the model came about."""
        manifest = model.manifest
        return {"classes": manifest.classes, "model": model.model_hash, "variant": model.variant,
                "checkpoint_sha256": manifest.checkpoint_sha256,
                "input_size": [1, manifest.image_size, manifest.image_size],
                "preprocessing": manifest.preprocessing, "adaptation": manifest.adaptation["method"]}

    @app.post("/v1/predict", dependencies=authorized)
    async def predict(request: Request) -> dict[str, Any]:
        """One DICOM file → class, confidence, probabilities, alarms and the model hash."""
        files = await uploaded_files(request, max_upload_bytes)
        if len(files) != 1:
            raise _fail(HTTP_BAD_REQUEST, f"{len(files)} files sent: /v1/predict takes one "
                                          "(several: /v1/predict/batch)")
        return await run_in_threadpool(predict_one, *files[0])

    @app.post("/v1/predict/batch", dependencies=authorized)
    async def predict_batch(request: Request) -> dict[str, Any]:
        """Several DICOM files (multipart ``file`` fields) → one result per file, in order."""
        files = await uploaded_files(request, max_upload_bytes)
        if len(files) > MAX_BATCH_FILES:
            raise _fail(HTTP_TOO_LARGE, f"{len(files)} files in one batch (at most {MAX_BATCH_FILES})")
        return await run_in_threadpool(predict_many, files)

    return app


def read_token(path: str | Path) -> str:
    """The bearer token in ``path`` (surrounding whitespace stripped); a clear error when missing or empty."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"{path}: token file not found (given with --token-file)")
    token = file.read_text().strip()
    if not token or any(c.isspace() for c in token):
        raise ValueError(f"{path}: token file must hold one token (non-empty, no spaces)")
    return token
