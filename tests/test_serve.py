"""The Serve endpoint: request checks and batch grouping as plain functions, then one Ray Serve app
on 127.0.0.1 (tiny model, a random ControlNet) called over real HTTP: images, determinism,
image/png, /docs, /healthz, /v1/info, 4xx errors, schema-driven fuzzing, concurrent batching."""

import base64
import io
import json
import threading
from collections import Counter
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from schemathesis.checks import (not_a_server_error, positive_data_acceptance, response_schema_conformance,
                                 status_code_conformance)
from schemathesis.generation import GenerationMode

from calora_ray.config import ServeConfig, build_config
from calora_ray.data.labels import PALETTE, colorize
from calora_ray.generation import BATCH_TOLERANCE
from calora_ray.serve import (COLORMASK_FORMAT, MASK_FORMAT, GenerationFailed, Limits, RequestError, SampleRequest,
                              build_api, generate_batch, parse_request)

PORT = 8391  # unusual on purpose: 8000 / 8265 may belong to someone else's cluster on this machine
URL = f"http://127.0.0.1:{PORT}"
LIMITS = dict(max_side=64, max_num_images=2, max_steps=3, default_steps=2, max_body_bytes=64 * 1024)


def png_b64(array: np.ndarray, mode: str | None = None) -> str:
    """Base64 PNG of a uint8 array; mode 'P' stores the values as palette indices."""
    image = Image.fromarray(array)
    if mode == "P":  # a full 256-entry palette, so PIL keeps the indices as they are
        image = Image.frombytes("P", array.shape[::-1], array.tobytes())
        image.putpalette(PALETTE.flatten().tolist())
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def toy_label(height=32, width=64, seed=0) -> np.ndarray:
    """Blocks of a few train ids and some ignore (255)."""
    rng = np.random.default_rng(seed)
    label = np.repeat(np.repeat(rng.choice([0, 2, 8, 10, 13, 255], size=(height // 8, width // 8)), 8, 0), 8, 1)
    return label.astype(np.uint8)


# ----------------------------------------------------------------------------- plain functions


def check(body, field, limits=Limits(**LIMITS), text=None):
    with pytest.raises(RequestError) as e:
        parse_request(body, limits)
    assert e.value.field == field and 400 <= e.value.status < 500, (e.value.field, str(e.value))
    if text:
        assert text in str(e.value), str(e.value)
    return str(e.value)


def test_parse_request_decodes_masks_colormasks_and_prompts():
    label = toy_label()
    r = parse_request({"mask": png_b64(label), "seed": 7, "num_images": 2}, Limits(**LIMITS))
    assert np.array_equal(r.label, label) and r.seeds == [7, 8] and r.steps == 2
    assert r.prompt.startswith("Photorealistic first-person urban street view with road") and "clear weather" in r.prompt
    night = parse_request({"mask": png_b64(label), "condition": "night"}, Limits(**LIMITS))
    assert night.prompt.endswith("at night") and 0 <= night.seeds[0] < 2**63  # random seed when none given
    colored = parse_request({"colormask": png_b64(colorize(label)), "prompt": "a street"}, Limits(**LIMITS))
    assert np.array_equal(colored.label, label) and colored.prompt == "a street"
    # a palette-mode (P) mask holds the ids as indices
    assert np.array_equal(parse_request({"mask": png_b64(label, "P")}, Limits(**LIMITS)).label, label)
    wrap = parse_request({"mask": png_b64(label), "seed": 2**63 - 1, "num_images": 2}, Limits(**LIMITS))
    assert wrap.seeds == [2**63 - 1, 0]


def test_bad_input_is_a_4xx_naming_the_field():
    label = toy_label()
    check({"mask": "not base64!!"}, "mask", text="not valid base64")
    check({"mask": base64.b64encode(b"GIF89a....").decode()}, "mask", text="not a PNG")
    check({"mask": base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 40).decode()}, "mask", text="not a readable PNG")
    check({"mask": png_b64(colorize(label))}, "mask", text="mode 'RGB'")
    check({"mask": png_b64(np.full((32, 32), 30, np.uint8))}, "mask", text="outside 0..18")
    check({"mask": png_b64(np.zeros((128, 128), np.uint8))}, "mask", text="larger than the maximum side 64")
    check({"mask": png_b64(np.zeros((40, 32), np.uint8))}, "mask", text="multiple of 32")
    check({"colormask": png_b64(np.full((32, 32, 3), 7, np.uint8))}, "colormask", text="outside the Cityscapes palette")
    check({"colormask": png_b64(label)}, "colormask", text="mode 'L'")
    check({}, "mask", text="exactly one")
    check({"mask": png_b64(label), "colormask": png_b64(colorize(label))}, "mask", text="exactly one")
    check({"mask": png_b64(label), "prompt": "x", "condition": "night"}, "condition")
    check({"mask": png_b64(label), "condition": "hazy"}, "condition")
    check({"mask": png_b64(label), "num_images": 3}, "num_images")
    check({"mask": png_b64(label), "num_inference_steps": 0}, "num_inference_steps")
    check({"mask": png_b64(label), "guidance_scale": float("nan")}, "guidance_scale")
    check({"mask": png_b64(label), "seed": -1}, "seed")
    check({"mask": png_b64(label), "sead": 1}, "sead")  # typos are errors, not silently ignored
    check([1, 2], "body")


def body_schema_validator(limits=Limits(**LIMITS)):
    """A JSON Schema validator of /v1/generate's body, taken from the app's own OpenAPI document."""
    openapi = build_api(None, dict, limits).openapi()
    ref = openapi["paths"]["/v1/generate"]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    return jsonschema.Draft202012Validator(openapi["components"]["schemas"][ref.rsplit("/", 1)[1]])


def accepted(body, limits=Limits(**LIMITS)) -> bool:
    try:
        parse_request(body, limits)
        return True
    except RequestError:
        return False


def test_the_schema_states_the_cross_field_rules_the_server_enforces():
    """Each cross-field rule is in the OpenAPI document, and schema and server agree on bodies that keep or
    break it (null counts as not given, in both)."""
    valid = body_schema_validator().is_valid
    mask, colormask = png_b64(toy_label()), png_b64(colorize(toy_label()))
    cases = [({"mask": mask}, True), ({"colormask": colormask}, True), ({"mask": mask, "colormask": None}, True),
             ({"mask": None, "colormask": colormask}, True), ({}, False), ({"mask": None}, False),
             ({"mask": mask, "colormask": colormask}, False), ({"mask": None, "colormask": None}, False),
             ({"mask": mask, "prompt": "a street", "condition": "night"}, False),
             ({"mask": mask, "prompt": None, "condition": "night"}, True),
             ({"mask": mask, "prompt": "a street", "condition": None}, True),
             ({"mask": mask, "num_images": LIMITS["max_num_images"] + 1}, False),
             ({"mask": mask, "seed": 2**63}, False), ({"mask": mask, "extra": 1}, False),
             ({"mask": "not base64!!"}, False), ({"mask": base64.b64encode(b"GIF89a....").decode()}, False),
             ({"mask": "\n".join(mask[i:i + 76] for i in range(0, len(mask), 76))}, True)]  # MIME line breaks
    for body, expected in cases:
        shown = {k: (v[:12] if isinstance(v, str) else v) for k, v in body.items()}
        assert valid(body) == expected, ("schema", shown)
        assert accepted(body) == expected, ("server", shown)


def asgi_call(app, body: bytes, headers=((b"content-type", b"application/json"),)) -> tuple[int, dict]:
    """POST /v1/generate to an ASGI app in process: (status, JSON body)."""
    import asyncio

    sent, messages = [], [{"type": "http.request", "body": body, "more_body": False}]

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/generate", "raw_path": b"/v1/generate", "query_string": b"", "root_path": "",
             "headers": [(b"content-length", str(len(body)).encode()), *headers], "server": ("127.0.0.1", 80),
             "client": ("127.0.0.1", 1)}
    try:
        asyncio.run(app(scope, receive, send))
    except Exception:  # noqa: BLE001 - Starlette re-raises a bug after answering (for the server's log)
        assert sent, "no answer before the exception"
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    return status, json.loads(b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body"))


def test_every_error_status_is_documented_with_its_body():
    """400 (not JSON, not UTF-8), 413, 422 and 500 (a failed generation, or a bug) answer the ErrorBody that
    the OpenAPI document lists for that status."""
    async def fails(_):
        raise GenerationFailed("generation failed: non-finite pixels")

    async def bug(_):
        raise KeyError("oops")

    limits = Limits(**LIMITS)
    openapi = build_api(None, dict, limits).openapi()
    documented = openapi["paths"]["/v1/generate"]["post"]["responses"]
    error_schema = {**openapi["components"]["schemas"]["ErrorBody"], "$defs": openapi["components"]["schemas"]}
    mask = json.dumps({"mask": png_b64(toy_label())}).encode()
    cases = [(fails, b"\xff\xfe{}", 400, "body"), (fails, b"{not json", 400, "body"),
             (fails, b"[1, 2]", 422, "body"), (fails, json.dumps({"mask": "x" * 70000}).encode(), 413, "body"),
             (fails, json.dumps({"mask": png_b64(toy_label()), "num_images": 9}).encode(), 422, "num_images"),
             (fails, mask, 500, None), (bug, mask, 500, None)]
    for run, body, status, field in cases:
        got, answer = asgi_call(build_api(run, dict, limits), body)
        assert got == status and answer["field"] == field, (body[:20], got, answer)
        assert str(status) in documented, status
        jsonschema.validate(answer, error_schema)
    assert {"200", "400", "413", "422", "500", "503"} == set(documented)


class RecordingGenerator:
    """Stands in for MaskGenerator: an image of its seed's value, and a record of every call."""

    def __init__(self, fail_steps=None):
        self.calls, self.fail_steps = [], fail_steps

    def generate(self, labels, prompts, seeds, steps, guidance, conditioning_scale):
        self.calls.append((steps, guidance, conditioning_scale, {label.shape for label in labels}, len(labels)))
        if steps == self.fail_steps:
            raise FloatingPointError("non-finite pixels")
        return [np.full((*label.shape, 3), s % 256, np.uint8) for label, s in zip(labels, seeds)]


def sample(steps=2, guidance=4.0, shape=(32, 32), seeds=(0,)):
    return SampleRequest(np.zeros(shape, np.uint8), "p", list(seeds), steps, guidance, 1.0)


def test_generate_batch_never_mixes_settings_and_isolates_failures():
    reqs = [sample(2, seeds=(1, 2)), sample(3, seeds=(3,)), sample(2, seeds=(4,)), sample(2, 1.0, seeds=(5,)),
            sample(2, shape=(32, 64), seeds=(6,)), sample(2, seeds=(7, 8))]
    gen = RecordingGenerator()
    results, call_sizes = generate_batch(gen, reqs, max_images_per_call=3)
    for steps, guidance, scale, shapes, n in gen.calls:
        assert len(shapes) == 1 and n <= 3
    assert sorted(call_sizes) == sorted(c[-1] for c in gen.calls) and sum(call_sizes) == 8
    # requests 0, 2, 5 share one key: 5 images split into calls of 3 + 2
    assert [c[-1] for c in gen.calls if c[:3] == (2, 4.0, 1.0) and c[3] == {(32, 32)}] == [3, 2]
    for r, pngs in zip(reqs, results):
        assert [int(np.asarray(Image.open(io.BytesIO(p)))[0, 0, 0]) for p in pngs] == r.seeds
        assert all(Image.open(io.BytesIO(p)).size == r.label.shape[::-1] for p in pngs)
    results, _ = generate_batch(RecordingGenerator(fail_steps=3), reqs)
    assert isinstance(results[1], FloatingPointError) and all(isinstance(r, list) for i, r in enumerate(results) if i != 1)


def test_cluster_yaml_is_a_valid_serve_config_and_build_app_takes_its_args(tmp_path):
    """cluster/serve.yaml passes Serve's own schema, and its `args:` (or `serve run` key=value text)
    build the app through ServeConfig: the same keys as jobs/serve.py's flags."""
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from calora_ray.config import ConfigError
    from calora_ray.serve import build_app

    doc = yaml.safe_load((Path(__file__).resolve().parents[1] / "cluster" / "serve.yaml").read_text())
    ServeDeploySchema.model_validate(doc)
    spec = doc["applications"][0]
    assert spec["import_path"] == "calora_ray.serve:build_app" and doc["http_options"]["host"] == "127.0.0.1"
    deployment = spec["deployments"][0]
    assert deployment["name"] == "SegmentationSampler" and deployment["ray_actor_options"]["num_gpus"] == 1
    assert set(deployment["autoscaling_config"]) == {"min_replicas", "max_replicas", "target_ongoing_requests"}
    cn = tmp_path / "cn"
    cn.mkdir()
    (cn / "config.json").write_text("{}")
    (cn / "diffusion_pytorch_model.safetensors").write_bytes(b"")  # the files a ControlNet directory has
    args = {k: v for k, v in spec["args"].items() if k not in ("lora", "controlnet")}
    app = build_app({**args, "controlnet": str(cn), "max_batch_size": "2", "max_replicas": "3", "num_gpus": "0"})
    options = app._bound_deployment._deployment_config
    assert options.user_config == {"max_batch_size": 2, "batch_wait_timeout_s": 0.05}
    assert options.autoscaling_config.max_replicas == 3
    with pytest.raises(ConfigError, match="max_batch_sise"):
        build_app({"controlnet": str(cn), "max_batch_sise": "2"})
    with pytest.raises(FileNotFoundError, match="--controlnet"):
        build_app({"controlnet": str(tmp_path / "missing")})


def test_serve_control_palette_is_checked_against_the_controlnets_record_and_stated_in_info(controlnet_dir, tmp_path):
    import shutil

    from calora_ray.data.labels import ADE20K_PALETTE
    from calora_ray.errors import UserError
    from calora_ray.serve import check_serve_inputs, class_table

    cn = tmp_path / "cn"
    shutil.copytree(controlnet_dir, cn)
    (cn / "controlnet.json").write_text(json.dumps({"control_palette": "cityscapes"}))
    check_serve_inputs(build_config(ServeConfig, {"controlnet": str(cn)}))
    with pytest.raises(UserError, match="trained on the cityscapes palette .* but --control-palette is ade20k"):
        check_serve_inputs(build_config(ServeConfig, {"controlnet": str(cn), "control_palette": "ade20k"}))
    table = class_table("ade20k")  # what /v1/info says: colormask colours stay Cityscapes', the conditioning ADE20K's
    assert table["control_palette"] == "ade20k"
    assert table["classes"][13]["color"] == PALETTE[13].tolist()
    assert table["classes"][13]["control_color"] == ADE20K_PALETTE[13].tolist() == [0, 102, 200]


def test_a_server_resolution_crops_every_mask_at_its_aspect_and_resizes_it(controlnet_dir):
    """--resolution 32x64 (HxW): a request's mask, whatever its size (at least 32 high and 64 wide), becomes a
    32 x 64 label, cropped at 2:1 (centred) and resized nearest-neighbour; smaller masks are a 422 on `mask`;
    the schema says so; a resolution the model cannot take fails before any replica starts."""
    from calora_ray.errors import UserError
    from calora_ray.generation import augment_layout
    from calora_ray.serve import check_serve_inputs, request_model

    limits = Limits(**{**LIMITS, "max_side": 128}, resolution="32x64")
    for height, width in ((64, 128), (40, 80), (64, 64), (32, 64)):  # 40 x 80 is no multiple of 32: fine here
        label = toy_label(height, width)
        request = parse_request({"mask": png_b64(label)}, limits)
        assert request.label.shape == (32, 64) and np.array_equal(request.label, augment_layout(label, (32, 64)))
        colored = parse_request({"colormask": png_b64(colorize(label))}, limits)
        assert np.array_equal(colored.label, request.label)
    square = toy_label(64, 64)  # its centre band, already 64 wide: no resize
    assert np.array_equal(parse_request({"mask": png_b64(square)}, limits).label, square[16:48])
    check({"mask": png_b64(toy_label(32, 32))}, "mask", limits,
          text="size 32x32 is smaller than the server's resolution 64x32 (width x height)")
    described = request_model(limits).model_json_schema()["properties"]["mask"]["description"]
    assert "crops it at its 64:32 aspect (centred) and resizes it nearest-neighbour to 64x32" in described
    check_serve_inputs(build_config(ServeConfig, {"controlnet": str(controlnet_dir), "resolution": "32x64"}))
    for bad in ("40x64", "64x2048"):
        with pytest.raises(UserError, match=f"--resolution {bad}: each side must be a multiple of 32 .* at most "
                                            "--max-side 1024"):
            check_serve_inputs(build_config(ServeConfig, {"controlnet": str(controlnet_dir), "resolution": bad}))


# ----------------------------------------------------------------------------- the Serve app over HTTP


@pytest.fixture(scope="module")
def server(controlnet_dir):
    """One Serve app for the module: max 4 requests per batch, a 0.3 s batch window, small limits."""
    import ray
    from ray import serve

    from calora_ray.serve import APP_NAME, application

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": PORT})
        cfg = build_config(ServeConfig, {"model": "tiny", "controlnet": str(controlnet_dir), "max_batch_size": 4,
                                         "batch_wait_timeout_s": 0.3, "threads": 1, **LIMITS})
        serve.run(application(cfg), name=APP_NAME, route_prefix="/")
        yield URL
    finally:
        serve.shutdown()
        ray.shutdown()


def post(body, **kwargs):
    return requests.post(f"{URL}/v1/generate", json=body, timeout=120, **kwargs)


def test_generates_the_masks_size_deterministically_as_the_in_process_generator(server, controlnet_dir):
    from calora_ray.generation import MaskGenerator

    label = toy_label(32, 64)
    body = {"mask": png_b64(label), "seed": 11, "num_inference_steps": 2, "num_images": 2}
    first = post(body)
    assert first.status_code == 200, first.text
    out = first.json()
    assert out["seeds"] == [11, 12] and out["width"] == 64 and out["height"] == 32 and len(out["images"]) == 2
    images = [Image.open(io.BytesIO(base64.b64decode(b))) for b in out["images"]]
    assert all(im.size == (64, 32) and im.mode == "RGB" for im in images)
    assert out["images"][0] != out["images"][1]  # another seed, another image
    assert post(body).json()["images"] == out["images"]  # same seed, same batch -> same bytes
    # the endpoint is MaskGenerator, not a copy of it: the same bytes in process (same batch, 1 thread each)
    gen = MaskGenerator("tiny", controlnet=str(controlnet_dir))
    direct = gen.generate([label, label], [out["prompt"]] * 2, [11, 12], steps=2)  # the same batch: the same bytes
    assert all(np.array_equal(np.asarray(im), d) for im, d in zip(images, direct))
    # alone, the image may differ by float rounding of batched kernels (MaskGenerator's docstring), no more
    alone = gen.generate([label], [out["prompt"]], [11], steps=2)[0]
    assert np.abs(alone.astype(int) - np.asarray(images[0]).astype(int)).max() <= BATCH_TOLERANCE
    # colormask = the same label in palette colours -> the same image
    colored = post({**body, "mask": None, "colormask": png_b64(colorize(label))})
    assert colored.json()["images"] == out["images"]
    # Accept: image/png -> one raw PNG: the same bytes as the JSON answer of the same one-image request, and
    # the pixels of the image made alone in process; the first image of the two-image batch only up to rounding
    single = post({**body, "num_images": 1}).json()
    raw = post({**body, "num_images": 1}, headers={"Accept": "image/png"})
    assert raw.status_code == 200 and raw.headers["content-type"] == "image/png"
    assert raw.content == base64.b64decode(single["images"][0]) and raw.headers["x-seed"] == "11"
    raw_pixels = np.asarray(Image.open(io.BytesIO(raw.content)))
    assert np.array_equal(raw_pixels, alone)
    assert np.abs(raw_pixels.astype(int) - np.asarray(images[0]).astype(int)).max() <= BATCH_TOLERANCE
    assert post(body, headers={"Accept": "image/png"}).status_code == 422  # two images cannot be one PNG


def test_docs_healthz_and_info(server):
    assert requests.get(f"{URL}/healthz", timeout=30).json() == {"status": "ok"}
    docs = requests.get(f"{URL}/docs", timeout=30)
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    schema = requests.get(f"{URL}/openapi.json", timeout=30).json()
    assert {"/v1/generate", "/healthz", "/v1/info"} <= set(schema["paths"])
    info = requests.get(f"{URL}/v1/info", timeout=30).json()
    assert info["model"] == "tiny" and info["lora_sha256"] == "" and len(info["controlnet_sha256"]) == 64
    assert [c["name"] for c in info["classes"]][:3] == ["road", "sidewalk", "building"]
    assert info["classes"][13]["color"] == PALETTE[13].tolist() and info["ignore"]["id"] == 255
    assert info["control_palette"] == "cityscapes" and info["classes"][13]["control_color"] == PALETTE[13].tolist()
    assert info["limits"]["max_side"] == 64 and info["limits"]["side_multiple"] == 32
    assert info["limits"]["max_num_images"] == 2 and info["batching"]["max_batch_size"] == 4


def test_bad_requests_over_http_are_4xx_naming_the_field(server):
    cases = [({"mask": "%%%"}, 422, "mask"), ({"mask": png_b64(np.full((32, 32), 40, np.uint8))}, 422, "mask"),
             ({"mask": png_b64(toy_label()), "num_images": 9}, 422, "num_images"),
             ({"mask": png_b64(toy_label()), "num_inference_steps": 100}, 422, "num_inference_steps"),
             ({"mask": "A" * (LIMITS["max_body_bytes"] + 10)}, 413, "body")]
    for body, status, field in cases:
        r = post(body)
        assert r.status_code == status and r.json()["field"] == field, (body.keys(), r.status_code, r.text[:200])
    for not_json in (b"{not json", b"\xff\xfe{}"):  # malformed, or not UTF-8: 400, documented in the schema
        r = requests.post(f"{URL}/v1/generate", data=not_json, headers={"Content-Type": "application/json"}, timeout=30)
        assert r.status_code == 400 and r.json()["field"] == "body", r.text
    # a streamed (chunked) body has no Content-Length: still cut off at the limit
    r = requests.post(f"{URL}/v1/generate", data=iter([b'{"mask": "' + b"A" * 40000, b"A" * 40000 + b'"}']),
                      headers={"Content-Type": "application/json"}, timeout=30)
    assert r.status_code == 413, r.text[:200]


# What the custom string formats of the schema name (calora_ray.serve.MASK_FORMAT / COLORMASK_FORMAT): base64 PNGs
# of train ids (mode L or P) or palette colours (RGB or P), each side a multiple of 32 up to LIMITS' max_side.
schema_labels = st.builds(lambda h, w, seed: np.random.default_rng(seed).choice(
    np.array([0, 2, 8, 13, 18, 255], np.uint8), size=(h, w)), st.sampled_from([32, 64]), st.sampled_from([32, 64]),
    st.integers(0, 99))
schemathesis.openapi.format(MASK_FORMAT, st.builds(png_b64, schema_labels, st.sampled_from(["L", "P"])))
schemathesis.openapi.format(COLORMASK_FORMAT, st.builds(lambda label: png_b64(colorize(label)), schema_labels))


def test_the_live_server_keeps_its_openapi_contract(server):
    """schemathesis against the live app's /openapi.json, bounded and derandomised: every request the schema
    allows is answered 200 (positive data acceptance), every answer's status is documented (status code
    conformance) with the documented body (response schema conformance), valid and invalid requests alike,
    and none is a 5xx."""
    schema = schemathesis.openapi.from_url(f"{server}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/generate", "/healthz", "/v1/info"}
    checks = [not_a_server_error, positive_data_acceptance, status_code_conformance, response_schema_conformance]
    statuses = Counter()
    for operation in operations:
        modes = [GenerationMode.POSITIVE] + ([GenerationMode.NEGATIVE] if operation.body else [])
        for mode in modes:
            @settings(max_examples=40 if operation.body else 3, deadline=None, suppress_health_check=list(HealthCheck),
                      derandomize=True, database=None)
            @given(case=operation.as_strategy(generation_mode=mode))
            def call(case):
                response = case.call_and_validate(checks=checks, timeout=120)
                statuses[(operation.path, mode.value, response.status_code)] += 1
                if mode == GenerationMode.POSITIVE:  # accepted means generated, not only "not rejected"
                    assert response.status_code == 200, response.text[:300]

            call()
    print(f"schemathesis: {sorted(statuses.items())}")
    generated = sum(n for (path, mode, status), n in statuses.items() if path == "/v1/generate" and status == 200)
    rejected = sum(n for (path, mode, status), n in statuses.items() if mode == "negative" and status in (400, 422))
    assert generated >= 20 and rejected >= 20, statuses  # both sides of the contract were exercised


# Valid values first and mostly: hypothesis favours early choices, so a fair share of bodies reaches generation.
ids = st.one_of(st.lists(st.sampled_from([0, 13, 255, 5, 18]), min_size=1, max_size=3),
                st.lists(st.sampled_from([19, 128, 254, 0]), min_size=1, max_size=3))
pngs = st.builds(
    lambda mode, h, w, ids, seed: png_b64(
        np.random.default_rng(seed).choice(ids, size=(h, w) if mode != "RGB" else (h, w, 3)).astype(np.uint8), mode),
    st.sampled_from(["L", "P", "RGB"]), st.sampled_from([32, 64, 1, 16, 96]), st.sampled_from([32, 64, 48]),
    ids, st.integers(0, 9))
bodies = st.fixed_dictionaries({"mask": pngs}, optional={
    "colormask": pngs, "prompt": st.text(max_size=30), "condition": st.sampled_from(["clear", "night", "x"]),
    "seed": st.one_of(st.integers(0, 2**63 - 1), st.integers(-1, 2**64)),
    "num_inference_steps": st.one_of(st.integers(1, 3), st.integers(0, 5)),
    "guidance_scale": st.one_of(st.floats(0, 10), st.floats(-1, 60)),
    "conditioning_scale": st.floats(0, 2), "num_images": st.one_of(st.integers(1, 2), st.integers(0, 3))})


def test_fuzz_with_real_pngs_never_500s(server):
    """Schema fuzzing rarely produces a decodable PNG; these bodies do (any mode, size, ids, settings)."""
    statuses = []

    @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True, database=None)
    @given(body=bodies)
    def call(body):
        r = post(body)
        statuses.append(r.status_code)
        assert r.status_code in (200, 422), r.text[:300]
        if r.status_code == 422:
            assert r.json()["field"] in body, r.text[:300]
        else:
            assert len(r.json()["images"]) == body.get("num_images", 1)

    call()
    print(f"real-PNG fuzz: {sorted(Counter(statuses).items())}")
    assert 200 in statuses and 422 in statuses, statuses  # both paths were exercised


def test_concurrent_clients_are_all_answered_in_batches_never_mixing_steps(server):
    label = toy_label(32, 32, seed=3)
    mask = png_b64(label)
    reference = {steps: post({"mask": mask, "seed": 5, "num_inference_steps": steps}).json()["images"][0]
                 for steps in (1, 2)}
    before = requests.get(f"{URL}/v1/info", timeout=30).json()["batching"]
    answers, errors = [], []

    def client(k):
        try:
            for i in range(3):
                steps = 1 + (k + i) % 2
                r = post({"mask": mask, "seed": 5, "num_inference_steps": steps})
                answers.append((steps, r.status_code, r.json()["images"][0] if r.ok else r.text))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors and len(answers) == 24
    assert all(status == 200 for _, status, _ in answers), [a[1:] for a in answers if a[1] != 200][:3]
    # a request batched with another step count still gets the image of its own step count (the reference
    # was made alone, the answers in batches of others: equal up to float rounding, BATCH_TOLERANCE)
    def pixels(b64):
        return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64)))).astype(int)

    assert np.abs(pixels(reference[1]) - pixels(reference[2])).mean() > 5  # the two step counts look different
    assert all(np.abs(pixels(image) - pixels(reference[steps])).max() <= BATCH_TOLERANCE for steps, _, image in answers)
    after = requests.get(f"{URL}/v1/info", timeout=30).json()["batching"]
    assert after["requests"] - before["requests"] == 24
    assert after["max_batch_size_seen"] > 1, json.dumps(after)
    assert after["max_batch_size_seen"] <= 4


def test_an_ade20k_palette_app_conditions_on_ade20k_colours_and_still_takes_cityscapes_colormasks(server,
                                                                                                   controlnet_dir):
    """A second app with --control-palette ade20k: /v1/info states it; a mask gives the image the in-process
    generator gives with the ADE20K palette (not the Cityscapes one), and a colormask in the Cityscapes colours
    of the API the same image."""
    from ray import serve

    from calora_ray.generation import MaskGenerator
    from calora_ray.serve import application

    cfg = build_config(ServeConfig, {"model": "tiny", "controlnet": str(controlnet_dir), "control_palette": "ade20k",
                                     "batch_wait_timeout_s": 0.0, "threads": 1, **LIMITS})
    serve.run(application(cfg), name="ade20k", route_prefix="/ade20k")
    try:
        info = requests.get(f"{URL}/ade20k/v1/info", timeout=30).json()
        assert info["control_palette"] == "ade20k" and info["classes"][13]["control_color"] == [0, 102, 200]
        label = toy_label(32, 64)
        body = {"mask": png_b64(label), "seed": 11, "num_inference_steps": 2}
        r = requests.post(f"{URL}/ade20k/v1/generate", json=body, timeout=120)
        assert r.status_code == 200, r.text
        image = np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))))
        prompt = r.json()["prompt"]
        ade = MaskGenerator("tiny", controlnet=str(controlnet_dir), control_palette="ade20k")
        assert np.array_equal(image, ade.generate([label], [prompt], [11], steps=2)[0])
        cityscapes = MaskGenerator("tiny", controlnet=str(controlnet_dir)).generate([label], [prompt], [11], steps=2)[0]
        assert not np.array_equal(image, cityscapes)
        colored = requests.post(f"{URL}/ade20k/v1/generate", json={**body, "mask": None,
                                                                    "colormask": png_b64(colorize(label))}, timeout=120)
        assert colored.json()["images"] == r.json()["images"]
    finally:
        serve.delete("ade20k")
