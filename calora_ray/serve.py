"""On-demand mask-conditioned sampling over HTTP: a Ray Serve application with a FastAPI ingress.

    python jobs/serve.py --model toy-sd --lora outputs/finetune --controlnet outputs/controlnet
    serve run calora_ray.serve:build_app model=toy-sd controlnet=outputs/controlnet
    serve deploy cluster/serve.yaml

The pieces, each usable on its own (only the last two need Ray):

- `Limits`, `request_model`, `decode_request` / `parse_request`: a JSON body -> a checked
  `SampleRequest` (label map, prompt, seeds, sampling settings), or a `RequestError` naming the
  field (invalid base64, not a PNG, wrong mode, ids or colours outside the class set, a size the
  model cannot take, ...). Plain functions: bad input is a 4xx, never a 500.
- `generate_batch`: many requests -> their PNGs, one `MaskGenerator.generate` call per group of
  requests that share steps, guidance, conditioning scale and size (they are never mixed).
- `build_api`: the FastAPI app (POST /v1/generate, GET /healthz, GET /v1/info, /docs) around any
  async `run(SampleRequest) -> [PNG bytes]`; testable without Ray.
- `SegmentationSampler`: the Serve deployment; `@serve.batch` collects concurrent requests into
  one `generate_batch` call; batch sizes are logged and counted in /v1/info.
- `build_app` (for `serve run` / `serve deploy`) and `run_serve` (jobs/serve.py).

The generator is calora_ray.generation.MaskGenerator, the same class the dataset job's Ray Data
actors use: a request with seed s gives the image that `generate([label], [prompt], [s])` gives.
"""

# No `from __future__ import annotations`: FastAPI reads the endpoint annotations at runtime, and
# the request model is built inside build_api (from the limits), where a string could not resolve.
import asyncio
import base64
import binascii
import io
import logging
import os
import secrets
import signal
import sys
import threading
import time
import urllib.parse
import dataclasses
from collections import Counter
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import numpy as np
import ray  # this module is the Ray Serve adapter: it always needs Ray
import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model
from ray import serve
from starlette.exceptions import HTTPException

from .config import Limits, ServeConfig, build_config, from_text, load_yaml, parse_resolution
from .controlnet import check_control_palette, controlnet_sha256, vae_factor_of
from .data.labels import CLASS_NAMES, IGNORE_INDEX, NUM_CLASSES, PALETTE, LabelError, palette_colors, validate_label
from .data.png import encode_png
from .distributed import ensure_ray
from .errors import UserError, UserValueError
from .generation import MaskGenerator, augment_layout, build_prompt
from .lora import lora_file
from .models import resolve_dtype
from .toyworld.world import CONDITIONS

logger = logging.getLogger("ray.serve")  # Serve routes this logger to the replica's log file

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SEED_SPACE = 2**63  # seeds are non-negative int64, like the dataset's `seed` column
APP_NAME = "calora"


# ----------------------------------------------------------------------------- request checks (no Ray)


class RequestError(UserError, ValueError):
    """Bad input: `field` names the JSON field (or 'body'), `status` is the HTTP status to answer."""

    def __init__(self, field: str, message: str, status: int = 422):
        super().__init__(f"{field}: {message}")
        self.field, self.status = field, status


@dataclass
class SampleRequest:
    """A checked request: everything `generate_batch` needs."""

    label: np.ndarray  # HxW uint8 train ids
    prompt: str
    seeds: list[int]
    steps: int
    guidance: float
    conditioning_scale: float

    @property
    def batch_key(self) -> tuple:
        """Requests with the same key can share one generate() call; others never do."""
        return (self.steps, self.guidance, self.conditioning_scale, self.label.shape)


MASK_FORMAT = "calora-train-id-png"  # custom OpenAPI string formats: a JSON Schema cannot say "a PNG whose pixels
COLORMASK_FORMAT = "calora-palette-png"  # are train ids"; the description says it, the name lets clients hook in

# Base64 text of a PNG: the PNG signature encodes as "iVBORw0KGgo"; whitespace (MIME line breaks) is skipped.
# The server checks the same two things (decode_png) with messages that say which one failed.
PNG_BASE64_PATTERN = r"^\s*iVBORw0KGgo[A-Za-z0-9+/=\s]*$"

# The rules that join fields, in the schema itself (JSON Schema, OpenAPI 3.1); decode_request enforces the same
# ones and tests/test_serve.py checks that schema and server agree on bodies that keep or break them. A field
# given as null counts as not given (what generated clients send for an unset optional field).
_GIVEN = {"not": {"type": "null"}}  # present and not null: given
CROSS_FIELD_RULES = {
    "oneOf": [{"required": ["mask"], "properties": {"mask": _GIVEN}},
              {"required": ["colormask"], "properties": {"colormask": _GIVEN}}],
    "not": {"required": ["prompt", "condition"], "properties": {"prompt": _GIVEN, "condition": _GIVEN}},
}


def request_model(limits: Limits):
    """The pydantic model of POST /v1/generate's body, its bounds taken from `limits` (so the OpenAPI
    schema at /openapi.json states exactly what the server accepts), with the cross-field rules
    (`CROSS_FIELD_RULES`) added to its JSON schema."""
    size = parse_resolution(limits.resolution)
    side = (f"each side a multiple of {limits.side_multiple} and at most {limits.max_side} pixels "
            "(GET /v1/info, `limits`)") if size is None else (
            f"at least {size[1]} wide and {size[0]} high, at most {limits.max_side} pixels a side: the server "
            f"crops it at its {size[1]}:{size[0]} aspect (centred) and resizes it nearest-neighbour to "
            f"{size[1]}x{size[0]} (GET /v1/info, `limits.resolution`, height x width)")

    def png(fmt: str):  # the string branch of `str | None` carries what the string must be
        return Annotated[str, Field(max_length=limits.max_body_bytes, json_schema_extra={
            "format": fmt, "pattern": PNG_BASE64_PATTERN, "contentEncoding": "base64",
            "contentMediaType": "image/png"})]

    return create_model(
        "GenerateRequest",
        __config__=ConfigDict(extra="forbid", json_schema_extra=CROSS_FIELD_RULES),
        mask=(png(MASK_FORMAT) | None, Field(None, description=(
            "Base64 PNG, mode L (or P), whose pixel values are Cityscapes train ids 0..18 (255 = ignore); "
            f"{'the image is generated at its size, ' if size is None else ''}{side}. "
            "Exactly one of `mask` and `colormask`."))),
        colormask=(png(COLORMASK_FORMAT) | None, Field(None, description=(
            "Base64 PNG, mode RGB (or P), coloured with the Cityscapes palette (GET /v1/info `classes`; black = "
            "ignore), whatever palette the server's ControlNet takes (`control_palette`), "
            f"{side}. Exactly one of `mask` and `colormask`."))),
        prompt=(str | None, Field(None, max_length=limits.max_prompt_chars, description=(
            "The prompt as is; without it, the paper's prompt for the mask's classes under `condition`. "
            "Not together with `condition`."))),
        condition=(Literal[tuple(CONDITIONS)] | None, Field(None, description=(
            "Weather/time of the paper's prompt (default clear); not together with `prompt`."))),
        seed=(int | None, Field(None, ge=0, lt=SEED_SPACE, description=(  # lt: 2^63 is exact as a float
            "Noise seed of image 0; image i uses (seed + i) mod 2^63. Default: a random one (returned)."))),
        num_inference_steps=(int, Field(limits.default_steps, ge=1, le=limits.max_steps)),
        guidance_scale=(float, Field(limits.default_guidance, ge=0.0, le=limits.max_guidance, allow_inf_nan=False)),
        conditioning_scale=(float, Field(1.0, ge=0.0, le=limits.max_conditioning_scale, allow_inf_nan=False)),
        num_images=(int, Field(1, ge=1, le=limits.max_num_images, description=(
            "Images to generate (seeds seed, seed + 1, ...); 1 with `Accept: image/png`."))),
    )


def decode_png(text: str, field: str, max_side: int) -> Image.Image:
    """A base64 PNG -> a loaded PIL image; RequestError naming `field` for anything else.

    The size is checked from the header before the pixels are decoded, so a small PNG that claims
    a huge size never allocates it."""
    try:
        data = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(field, "not valid base64") from None
    if not data.startswith(PNG_SIGNATURE):
        raise RequestError(field, "not a PNG (no PNG signature after base64 decoding)")
    try:
        image = Image.open(io.BytesIO(data), formats=["PNG"])
        width, height = image.size
        if width > max_side or height > max_side:
            raise RequestError(field, f"{width}x{height} is larger than the maximum side {max_side}")
        image.load()
    except RequestError:
        raise
    except Exception as e:  # PIL raises many kinds on crafted files; all of them are the client's input
        raise RequestError(field, f"not a readable PNG ({type(e).__name__}: {e})") from None
    return image


# 24-bit colour -> train id for the 19 palette colours; black is ignore (255).
_COLOR_TO_ID = {int(r) << 16 | int(g) << 8 | int(b): i for i, (r, g, b) in enumerate(PALETTE[:NUM_CLASSES])}
_COLOR_TO_ID[0] = IGNORE_INDEX


def labels_from_colors(rgb: np.ndarray, field: str = "colormask") -> np.ndarray:
    """HxWx3 uint8 palette colours -> HxW uint8 train ids; a colour outside the palette is an error."""
    codes = rgb[..., 0].astype(np.uint32) << 16 | rgb[..., 1].astype(np.uint32) << 8 | rgb[..., 2]
    values, inverse = np.unique(codes, return_inverse=True)
    ids = np.array([_COLOR_TO_ID.get(int(v), -1) for v in values], dtype=np.int32)
    if (ids < 0).any():
        bad = values[ids < 0]
        shown = ", ".join(f"({v >> 16}, {v >> 8 & 255}, {v & 255})" for v in bad[:5])
        pixels = int(np.isin(codes, bad).sum())
        raise RequestError(field, f"{len(bad)} colour(s) outside the Cityscapes palette (GET /v1/info), e.g. "
                                  f"{shown} ({pixels} pixels); palette images must not be resized or smoothed")
    return ids[inverse.reshape(codes.shape)].astype(np.uint8)


def decode_label(mask: str | None, colormask: str | None, limits: Limits) -> np.ndarray:
    """The HxW train-id map of a request from exactly one of `mask` / `colormask`."""
    if (mask is None) == (colormask is None):
        raise RequestError("mask", "give exactly one of `mask` (train ids) or `colormask` (palette colours)")
    field = "mask" if mask is not None else "colormask"
    image = decode_png(mask if mask is not None else colormask, field, limits.max_side)
    if field == "mask":
        if image.mode not in ("L", "P"):
            raise RequestError(field, f"PNG mode {image.mode!r}; expected 'L' (8-bit train ids, or 'P' indices); "
                                      "send a colour-coded mask as `colormask`")
        try:
            label = validate_label(image, field)
        except LabelError as e:
            raise RequestError(field, str(e).removeprefix(f"{field}: ")) from None
    else:
        if image.mode not in ("RGB", "P"):
            raise RequestError(field, f"PNG mode {image.mode!r}; expected 'RGB' (or 'P') palette colours")
        label = labels_from_colors(np.asarray(image.convert("RGB")), field)
    height, width = label.shape
    size = parse_resolution(limits.resolution)
    if size is not None:  # the server's one size: crop at its aspect, resize nearest (as jobs/generate.py does)
        if height < size[0] or width < size[1]:
            raise RequestError(field, f"size {width}x{height} is smaller than the server's resolution "
                                      f"{size[1]}x{size[0]} (width x height); masks are only ever downscaled")
        return augment_layout(label, size)
    m = limits.side_multiple
    if height % m or width % m:
        raise RequestError(field, f"size {width}x{height}: each side must be a multiple of {m} (the model's "
                                  "VAE factor x 8); crop or resize it nearest-neighbour first")
    return label


def decode_request(body, limits: Limits) -> SampleRequest:
    """A body that passed `request_model(limits)` -> a SampleRequest (RequestError on bad input)."""
    label = decode_label(body.mask, body.colormask, limits)
    if body.prompt is not None and body.condition is not None:
        raise RequestError("condition", "give `prompt` or `condition`, not both (the condition only "
                                        "phrases the default prompt)")
    prompt = body.prompt if body.prompt is not None else build_prompt(label, body.condition or "clear")
    seed = body.seed if body.seed is not None else secrets.randbelow(SEED_SPACE)
    seeds = [(seed + i) % SEED_SPACE for i in range(body.num_images)]
    return SampleRequest(label, prompt, seeds, body.num_inference_steps, float(body.guidance_scale),
                         float(body.conditioning_scale))


def parse_request(data: Any, limits: Limits) -> SampleRequest:
    """A JSON value (the decoded body) -> a SampleRequest: the schema check, then `decode_request`."""
    try:
        body = request_model(limits).model_validate(data)
    except ValidationError as e:
        raise RequestError(*_first_error(e.errors())) from None
    return decode_request(body, limits)


def _first_error(errors) -> tuple[str, str]:
    """(field, message) of the first pydantic/FastAPI validation error."""
    if not errors:
        return "body", "invalid request"
    err = errors[0]
    loc = [p for p in err.get("loc", ()) if p != "body"]
    # a leading int is a position (malformed JSON) or a list index of a non-object body: the body's fault
    field = loc[0] if loc and isinstance(loc[0], str) else "body"
    return field, str(err.get("msg", "invalid value"))


# ----------------------------------------------------------------------------- batches (no Ray)


@dataclass
class BatchStats:
    """How batching went: requests per batch and images per generate() call (histograms)."""

    batches: int = 0
    requests: int = 0
    batch_sizes: Counter = field(default_factory=Counter)
    call_sizes: Counter = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record(self, num_requests: int, call_sizes: list[int]) -> None:
        with self.lock:
            self.batches += 1
            self.requests += num_requests
            self.batch_sizes[num_requests] += 1
            self.call_sizes.update(call_sizes)

    def as_dict(self) -> dict:
        with self.lock:
            return {"batches": self.batches, "requests": self.requests,
                    "max_batch_size_seen": max(self.batch_sizes, default=0),
                    "batch_size_histogram": {str(k): v for k, v in sorted(self.batch_sizes.items())},
                    "images_per_call_histogram": {str(k): v for k, v in sorted(self.call_sizes.items())}}


def generate_batch(generator, requests: list[SampleRequest], max_images_per_call: int = 16
                   ) -> tuple[list[list[bytes] | Exception], list[int]]:
    """PNG bytes of every image of every request, and the image count of each generate() call.

    Requests are grouped by `batch_key` (steps, guidance, conditioning scale, size) and each
    group's images go through `generator.generate` together, at most `max_images_per_call` at a
    time; an image depends only on its own label, prompt and seed, so grouping does not change it.
    A failing call fails only its own requests (their slot holds the exception).
    """
    groups: dict[tuple, list[int]] = {}
    for i, r in enumerate(requests):
        groups.setdefault(r.batch_key, []).append(i)
    results: list[Any] = [[] for _ in requests]
    call_sizes = []
    for members in groups.values():
        items = [(i, k) for i in members for k in range(len(requests[i].seeds))]
        for start in range(0, len(items), max_images_per_call):
            chunk = items[start:start + max_images_per_call]
            first = requests[chunk[0][0]]
            alive = [(i, k) for i, k in chunk if not isinstance(results[i], Exception)]
            if not alive:
                continue
            try:
                images = generator.generate([requests[i].label for i, _ in alive],
                                            [requests[i].prompt for i, _ in alive],
                                            [requests[i].seeds[k] for i, k in alive],
                                            steps=first.steps, guidance=first.guidance,
                                            conditioning_scale=first.conditioning_scale)
            except Exception as e:  # noqa: BLE001 - reported to those requests as a 500
                for i, _ in alive:
                    results[i] = e
                continue
            call_sizes.append(len(alive))
            for (i, _), image in zip(alive, images):
                if not isinstance(results[i], Exception):
                    results[i].append(encode_png(image))
    return results, call_sizes


# ----------------------------------------------------------------------------- the HTTP API (no Ray)


class _BodyLimit:
    """ASGI middleware: bodies over `max_bytes` get 413, by Content-Length or while streaming."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = JSONResponse({"detail": f"body: larger than the maximum of {self.max_bytes} bytes",
                                  "field": "body"}, status_code=413)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await too_large(scope, receive, send)
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:  # FastAPI re-raises an HTTPException from the body read as is
                    raise HTTPException(413, f"body: larger than the maximum of {self.max_bytes} bytes")
            return message

        await self.app(scope, limited_receive, send)


class ErrorBody(BaseModel):
    """Every error answer of the API (400, 413, 422, 500)."""

    detail: str = Field(description="What is wrong, starting with the field's name: 'mask: not valid base64'.")
    field: str | None = Field(description="The request field at fault ('body' for the body as a whole); null "
                                          "when no field is (a failed generation).")


class GenerateResponse(BaseModel):
    images: list[str] = Field(description="Base64 PNGs, mode RGB, the mask's size.")
    seeds: list[int] = Field(description="The seed of each image.")
    prompt: str = Field(description="The prompt used (the paper's prompt when the request gave none).")
    width: int
    height: int


class Health(BaseModel):
    status: Literal["ok"]


class GenerationFailed(RuntimeError):
    """A generate() call failed on the replica (the server's fault: a 500 with an ErrorBody)."""


def _error_response(description: str) -> dict:
    return {"model": ErrorBody, "description": description}


# Every status /v1/generate answers, with its body; the app's schema lists them (tests/test_serve.py checks
# the live server against it with schemathesis).
GENERATE_ERRORS = {
    400: _error_response("The body is not a JSON document (malformed, or not UTF-8); `field` is 'body'."),
    413: _error_response("The body is larger than the server's `max_body_bytes` (GET /v1/info, `limits`)."),
    422: _error_response(
        "A JSON body that breaks a rule; `field` names the field: a schema rule (type, bounds, unknown field, "
        "exactly one of mask/colormask, prompt or condition), a mask that is not a PNG of the described mode, "
        "with ids or colours outside the class set or sides that are not a multiple of `side_multiple`, or "
        "`Accept: image/png` with num_images other than 1."),
    500: _error_response("Generation failed on the server; `field` is null."),
    503: {"description": "All replicas are busy and the queue is full (Ray Serve's `max_queued_requests`); "
                         "retry later.", "content": {"text/plain": {"schema": {"type": "string"}}}},
}


def build_api(run, info, limits: Limits):
    """The FastAPI app. `run(SampleRequest)` is an async callable returning the PNG bytes of its
    images; `info()` returns the /v1/info document (model, adapters, classes, limits, batching)."""
    Body = request_model(limits)

    app = FastAPI(
        title="calora_ray: mask-conditioned sampling",
        description="Cityscapes train-id masks -> images whose label is the mask (CA-LoRA + segmentation "
                    "ControlNet). `Accept: image/png` on /v1/generate returns one raw PNG.",
        version="1")
    app.add_middleware(_BodyLimit, max_bytes=limits.max_body_bytes)

    def error(status: int, field: str | None, message: str) -> JSONResponse:
        detail = f"{field}: {message}" if field else message
        return JSONResponse({"detail": detail, "field": field}, status_code=status)

    @app.exception_handler(RequestError)
    async def _request_error(_, e: RequestError):
        return error(e.status, e.field, str(e).removeprefix(f"{e.field}: "))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_, e: RequestValidationError):
        errors = e.errors()
        if errors and errors[0].get("type") == "json_invalid":  # not JSON at all: the request's syntax
            return error(400, "body", f"not a JSON document ({errors[0].get('ctx', {}).get('error', 'invalid')})")
        return error(422, *_first_error(errors))

    @app.exception_handler(HTTPException)
    async def _http_error(_, e: HTTPException):
        if e.status_code == 400:  # FastAPI's answer to a body it cannot decode (not UTF-8)
            return error(400, "body", "not a JSON document (not UTF-8 text)")
        detail = str(e.detail)  # 413 from _BodyLimit names the body; 404 / 405 name no field
        field = "body" if detail.startswith("body:") else None
        return JSONResponse({"detail": detail, "field": field}, status_code=e.status_code, headers=e.headers)

    @app.exception_handler(GenerationFailed)
    async def _generation_failed(_, e: GenerationFailed):
        return error(500, None, str(e))

    @app.exception_handler(Exception)
    async def _server_error(_, e: Exception):  # a bug of ours: still the documented body (Starlette logs it)
        return error(500, None, f"internal error ({type(e).__name__})")

    @app.post("/v1/generate", response_model=GenerateResponse, responses={
        200: {"content": {"image/png": {"schema": {"type": "string", "contentMediaType": "image/png"}}},
              "description": "JSON, or one raw PNG with `Accept: image/png` (headers X-Seed and X-Prompt, "
                             "URL-quoted, say how it was made)."},
        **GENERATE_ERRORS})
    async def generate(body: Body, request: Request):
        """Generate `num_images` images for one mask."""
        sample = decode_request(body, limits)
        raw = "image/png" in request.headers.get("accept", "")
        if raw and len(sample.seeds) != 1:
            raise RequestError("num_images", "`Accept: image/png` returns one image: ask for num_images 1")
        pngs = await run(sample)
        height, width = sample.label.shape
        if raw:
            return Response(pngs[0], media_type="image/png", headers={
                "X-Seed": str(sample.seeds[0]), "X-Prompt": urllib.parse.quote(sample.prompt)})
        return JSONResponse({"images": [base64.b64encode(p).decode("ascii") for p in pngs], "seeds": sample.seeds,
                             "prompt": sample.prompt, "width": width, "height": height})

    @app.get("/healthz", response_model=Health)
    async def healthz():
        """Liveness: the replica is up and its model is loaded."""
        return {"status": "ok"}

    @app.get("/v1/info", response_model=dict[str, Any])
    async def v1_info():
        """Model, LoRA hash, ControlNet, classes, palette, limits and batching statistics."""
        return info()

    return app


def class_table(control_palette: str = "cityscapes") -> dict:
    """The class set a mask may use: names by train id, their Cityscapes palette colours (what a
    `colormask` uses), the ignore id; and the palette the ControlNet's conditioning image is drawn in,
    with each class's colour there (`control_color`)."""
    control = palette_colors(control_palette)
    return {"classes": [{"id": i, "name": n, "color": PALETTE[i].tolist(), "control_color": control[i].tolist()}
                        for i, n in enumerate(CLASS_NAMES)],
            "ignore": {"id": IGNORE_INDEX, "color": [0, 0, 0]}, "conditions": list(CONDITIONS),
            "control_palette": control_palette}


# ----------------------------------------------------------------------------- the Serve deployment

def limits_dict(limits: Limits) -> dict:
    """The request bounds of a config (a ServeConfig is a Limits), as /v1/info reports them."""
    return {f.name: getattr(limits, f.name) for f in dataclasses.fields(Limits)}


@serve.deployment(name="SegmentationSampler", health_check_period_s=30)
@serve.ingress()
class SegmentationSampler:
    """One replica: the MaskGenerator, loaded once; concurrent requests generated in batches."""

    def __init__(self, cfg: ServeConfig):
        gpu = torch.cuda.is_available()
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)  # what Serve gave this replica
        self.threads = cfg.threads or (1 if gpu else max(1, int(np.ceil(cpus))))
        torch.set_num_threads(self.threads)
        device = torch.device("cuda" if gpu else "cpu")
        self.generator = MaskGenerator(cfg.model, lora=cfg.lora, controlnet=cfg.controlnet,
                                       device=device, dtype=resolve_dtype(cfg.mixed_precision, device, cpu_bf16=True),
                                       model_seed=cfg.model_seed, control_palette=cfg.control_palette)
        factor = self.generator.components.vae_scale_factor * 8
        max_side = cfg.max_side // factor * factor
        if max_side < factor:
            raise ValueError(f"--max-side {cfg.max_side} is below the smallest size the model takes ({factor})")
        self.cfg = cfg
        self.limits = dataclasses.replace(cfg, max_side=max_side, side_multiple=factor)
        self.max_images_per_call = cfg.max_images_per_call
        self.stats = BatchStats()
        self.static_info = {
            "model": cfg.model, "model_seed": cfg.model_seed,
            "lora": cfg.lora, "lora_sha256": self.generator.lora_sha256,
            "controlnet": cfg.controlnet, "controlnet_sha256": controlnet_sha256(cfg.controlnet),
            "device": str(device), "dtype": str(self.generator.dtype).removeprefix("torch."),
            "native_resolution": self.generator.native_resolution, **class_table(cfg.control_palette),
            "limits": limits_dict(self.limits)}
        self.reconfigure({"max_batch_size": cfg.max_batch_size, "batch_wait_timeout_s": cfg.batch_wait_timeout_s})

    def reconfigure(self, user_config: dict) -> None:
        """Serve's user_config (cluster/serve.yaml): batching knobs change live, without a restart."""
        self.max_batch_size = int(user_config.get("max_batch_size", self.cfg.max_batch_size))
        self.batch_wait_timeout_s = float(user_config.get("batch_wait_timeout_s", self.cfg.batch_wait_timeout_s))
        self.generate_batched.set_max_batch_size(self.max_batch_size)
        self.generate_batched.set_batch_wait_timeout_s(self.batch_wait_timeout_s)

    def __serve_build_asgi_app__(self):
        return build_api(self.generate, self.info, self.limits)

    async def generate(self, request: SampleRequest) -> list[bytes]:
        result = await self.generate_batched(request)
        if isinstance(result, Exception):  # @serve.batch hands a returned exception back as a value
            raise result
        return result

    def info(self) -> dict:
        return {**self.static_info, "batching": {
            "max_batch_size": self.max_batch_size, "batch_wait_timeout_s": self.batch_wait_timeout_s,
            "max_images_per_call": self.max_images_per_call,
            "replica": serve.get_replica_context().replica_id.unique_id, **self.stats.as_dict()}}

    def _run_batch(self, requests: list[SampleRequest]):
        torch.set_num_threads(self.threads)  # OpenMP thread counts are per calling thread
        started = time.perf_counter()
        results, call_sizes = generate_batch(self.generator, requests, self.max_images_per_call)
        self.stats.record(len(requests), call_sizes)
        logger.info("batch of %d request(s): generate() calls of %s image(s) in %.2f s",
                    len(requests), call_sizes, time.perf_counter() - started)
        return results

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def generate_batched(self, requests: list[SampleRequest]) -> list[list[bytes]]:
        # In a thread, so the replica's event loop keeps taking requests (the next batch) meanwhile.
        results = await asyncio.to_thread(self._run_batch, requests)
        return [GenerationFailed(f"generation failed: {r}") if isinstance(r, Exception) else r for r in results]


def check_serve_inputs(cfg: ServeConfig) -> None:
    """Fail in the driver, naming the flag, before a replica would crash-loop on a bad path."""
    if cfg.controlnet is None:
        raise UserValueError("--controlnet is required: the segmentation ControlNet (jobs/train_controlnet.py output) "
                             "makes the mask the image's label")
    check_control_palette(cfg.controlnet, cfg.control_palette)  # checks the directory too
    if cfg.lora is not None:
        lora_file(cfg.lora)
    size = parse_resolution(cfg.resolution)
    factor = vae_factor_of(cfg.controlnet) * 8  # the side multiple a replica sets (SegmentationSampler)
    if size is not None and (size[0] % factor or size[1] % factor or max(size) > cfg.max_side // factor * factor):
        raise UserValueError(f"--resolution {cfg.resolution}: each side must be a multiple of {factor} (the "
                             f"model's VAE factor x 8) and at most --max-side {cfg.max_side}")


def application(cfg: ServeConfig):
    """The Serve application of a ServeConfig: replicas, resources, autoscaling, batching knobs."""
    check_serve_inputs(cfg)
    # the replicas may start in another working directory: absolute paths travel
    cfg = dataclasses.replace(
        cfg, lora=os.path.abspath(cfg.lora) if cfg.lora and "://" not in cfg.lora else cfg.lora,
        controlnet=os.path.abspath(cfg.controlnet) if "://" not in cfg.controlnet else cfg.controlnet)
    num_gpus = cfg.num_gpus
    if num_gpus is None:
        num_gpus = 1 if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) else 0
    options: dict[str, Any] = dict(
        ray_actor_options={"num_cpus": cfg.num_cpus, "num_gpus": num_gpus},
        max_ongoing_requests=cfg.max_ongoing_requests, max_queued_requests=cfg.max_queued_requests,
        user_config={"max_batch_size": cfg.max_batch_size, "batch_wait_timeout_s": cfg.batch_wait_timeout_s})
    if cfg.max_replicas is not None and cfg.max_replicas > cfg.num_replicas:
        options["autoscaling_config"] = {"min_replicas": cfg.num_replicas, "max_replicas": cfg.max_replicas,
                                         "target_ongoing_requests": cfg.target_ongoing_requests}
    else:
        options["num_replicas"] = cfg.num_replicas
    return SegmentationSampler.options(**options).bind(cfg)


def build_app(args: dict):
    """`serve run calora_ray.serve:build_app model=toy-sd controlnet=DIR [key=value ...]` and the
    `args:` of cluster/serve.yaml: the keys are jobs/serve.py's flags (config=FILE.yaml works too)."""
    args = dict(args or {})
    values = load_yaml(args.pop("config"), ServeConfig, "serve") if "config" in args else {}
    values.update({k.replace("-", "_"): from_text(ServeConfig, k, v) for k, v in args.items()})
    return application(build_config(ServeConfig, values))


def run_serve(cfg, block: bool = True) -> str:
    """jobs/serve.py: start Serve (HTTP on cfg.host:cfg.port), deploy the app, and (block) serve until
    interrupted; on a local cluster this process started, Ctrl-C shuts everything down. Returns the URL."""
    check_serve_inputs(cfg)
    url = f"http://{cfg.host}:{cfg.port}"
    if block:
        def stop(signum, frame):
            raise KeyboardInterrupt

        # SIGTERM (a supervisor, `kill`) stops as cleanly as Ctrl-C; SIGINT too when a shell started
        # us in the background with SIGINT ignored.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, stop)
    started_ray = ensure_ray(cfg.address, cfg.ray_connect_timeout_s, verbose=cfg.verbose)  # ours: stopped at the end
    try:
        serve.start(http_options={"host": cfg.host, "port": cfg.port})
        serve.run(application(cfg), name=APP_NAME, route_prefix="/", blocking=False)
        if not block:
            return url
        print(f"serving {cfg.model} on {url}  (docs: {url}/docs, info: {url}/v1/info); Ctrl-C stops",
              file=sys.stderr, flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        if block:
            if started_ray:
                serve.shutdown()
                ray.shutdown()
            else:
                serve.delete(APP_NAME)
    return url


__all__ = [
    "COLORMASK_FORMAT",
    "MASK_FORMAT",
    "BatchStats",
    "ErrorBody",
    "GenerationFailed",
    "Limits",
    "RequestError",
    "SampleRequest",
    "SegmentationSampler",
    "application",
    "build_api",
    "build_app",
    "check_serve_inputs",
    "class_table",
    "decode_label",
    "decode_png",
    "decode_request",
    "generate_batch",
    "labels_from_colors",
    "parse_request",
    "request_model",
    "run_serve",
]
