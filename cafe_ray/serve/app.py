"""Ray Serve application: one deployment serving every client's personal dynamic model.

:class:`ClientModels` is a thin shell around :class:`~cafe_ray.serve.service.ModelService`:

* its replicas multiplex the personal models by client id (``serve.multiplexed``, a bounded
  LRU of ``max_models_per_replica`` models per replica; the model id is the client id);
* concurrent requests are queued by ``serve.batch`` and each batch is answered by
  :func:`~cafe_ray.serve.core.run_jobs`, which groups them by client model and policy and runs
  every sample only as deep as its policy decides;
* HTTP JSON API through a FastAPI ingress (OpenAPI schema at ``/openapi.json``), and the same
  calls on a deployment handle (``predict``, ``clients``, ``client``, ``policies``, ``health``).

HTTP requests name the client in the URL. A client may also send the
``serve_multiplexed_model_id: <client_id>`` header, so that Serve routes it to a replica that
has the model loaded already (the two must agree). Handle calls name the client with
``handle.options(multiplexed_model_id=str(client_id))``.
"""

# No `from __future__ import annotations` here: FastAPI reads the route signatures after Serve
# rewrites them, and needs the annotations as objects, not strings.
import asyncio
import json
import math
import time
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import ValidationError
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from cafe_ray.serve.config import ServeConfig, server_url
from cafe_ray.serve.core import (
    SLO,
    Answer,
    ClientMismatch,
    Job,
    RequestError,
    client_from_model_id,
    decode_npy,
)
from cafe_ray.serve.http import (
    JSON,
    NPY,
    BodyGuard,
    InvalidBody,
    check_json_shape,
    check_media_type,
    error_body,
    error_items,
    validation_items,
)
from cafe_ray.serve.schemas import (
    ClientDetail,
    ClientsResponse,
    ErrorResponse,
    Health,
    PoliciesResponse,
    PredictRequest,
    PredictResponse,
    StatsResponse,
)
from cafe_ray.serve.service import ModelService, learned_paths

MODEL_ID_HEADER = "serve_multiplexed_model_id"
DEPLOYMENT = "ClientModels"
DEFAULT_MAX_BODY_BYTES = ServeConfig.model_fields["max_body_bytes"].default


def _err(description: str) -> dict[str, Any]:
    return {"model": ErrorResponse, "description": description}


_ERRORS: dict[int | str, dict[str, Any]] = {
    400: _err("The serve_multiplexed_model_id header names another client than the URL."),
    404: _err("Unknown client id (or no such route)."),
    405: _err("The path exists but not with this method (the Allow header lists the one it takes)."),
    413: _err("A body over the server's byte limit (checked before parsing), a JSON body with more values or "
              "more samples than its max_batch allows; the message gives the limit."),
    415: _err(f"Missing or unsupported Content-Type; send {JSON} or {NPY}."),
    422: _err("Malformed JSON or JSON nested too deep, a value of the wrong JSON type (no coercion), wrong "
              "input shape or dtype, NaN/infinite values or values that overflow the model, unknown or empty "
              "policy, or a parameter out of range (the detail says which and what is accepted)."),
}
_CLIENT_ERRORS = {404: _ERRORS[404], 405: _ERRORS[405], 422: _ERRORS[422]}
_GET_ERRORS = {405: _ERRORS[405]}

# Request fields a query string may carry (a .npy body has no other place for them; a JSON body
# may put each in the body or the query, not both).
_NPY_QUERY = ("policy", "threshold", "max_entropy", "mac_budget", "return_probs", "latency_slo_ms")
_PREDICT_BODY: dict[str, Any] = {
    "requestBody": {"required": True, "content": {
        JSON: {"schema": {"$ref": "#/components/schemas/PredictRequest"}},
        NPY: {"schema": {"type": "string", "format": "binary",
                         "description": "numpy.save of a (batch, *input_shape) array (float32 for images, "
                                        "int64 for text); the policy fields go in the query string."}},
    }},
    "parameters": [{"name": n, "in": "query", "required": False,
                    "description": f"The PredictRequest field {n} (an {NPY} body's only way to give it; a JSON "
                                   "body may give it here instead of in the body, not in both).",
                    "schema": PredictRequest.model_json_schema()["properties"][n]} for n in _NPY_QUERY],
}

api = FastAPI(
    title="cafe-ray serving",
    version="1",
    description="Personalized early-exit models of a cafe-ray run: one model per client, each sample run "
                "only as deep as its exit policy decides. Exits are numbered 1-based (`exit`) and 0-based "
                "(`exit_index`); MACs count every stage and exit head a sample ran. Every 4xx answer is "
                "`{\"detail\": [{\"loc\", \"msg\", \"type\"}]}`.",
    openapi_url=None, docs_url=None, redoc_url=None,  # served by ClientModels (the schema has its example)
)
# Set by the replica from its ServeConfig before the first request (the middleware stack is built
# lazily, on first use).
_LIMITS: dict[str, int] = {"max_body_bytes": DEFAULT_MAX_BODY_BYTES}
api.add_middleware(BodyGuard, limits=_LIMITS)


def openapi_schema(app: FastAPI, example: dict[str, Any] | None = None) -> dict[str, Any]:
    """The API's schema, with PredictRequest (read by hand from the body, so FastAPI does not find
    it) and ``example``, a request built from the served model's real input shape."""
    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    comps = schema.setdefault("components", {}).setdefault("schemas", {})
    req = PredictRequest.model_json_schema(ref_template="#/components/schemas/{model}")
    comps.update(req.pop("$defs", {}))
    if example:
        req["examples"] = [example]
        schema["paths"]["/v1/clients/{client_id}/predict"]["post"]["requestBody"]["content"][JSON]["example"] = example
    comps["PredictRequest"] = req
    return schema


def _error_response(status: int, items: list[dict[str, Any]], headers: dict[str, str] | None = None) -> Response:
    return Response(error_body(items), status_code=status, media_type=JSON, headers=headers)


@api.exception_handler(RequestError)
async def _request_error(request: Request, err: RequestError) -> Response:
    return _error_response(err.status_code, error_items(err))


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, err: RequestValidationError) -> Response:
    return _error_response(422, validation_items(err.errors()))


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, err: StarletteHTTPException) -> Response:
    loc = ["method"] if err.status_code == 405 else ["url"] if err.status_code == 404 else []
    return _error_response(err.status_code, [{"loc": loc, "msg": str(err.detail), "type": f"http_{err.status_code}"}],
                           headers=getattr(err, "headers", None))


def _query_fields(query: dict[str, str]) -> PredictRequest:
    extra = sorted(set(query) - set(_NPY_QUERY))
    if extra:
        raise InvalidBody([{"loc": ["query", k], "msg": f"unknown query parameter; a predict request takes "
                            f"{', '.join(_NPY_QUERY)}", "type": "extra_forbidden"} for k in extra])
    try:  # query values are strings by nature: parsed (not strict), still finite and in range
        return PredictRequest.model_validate(query, strict=False)
    except ValidationError as err:
        raise InvalidBody(validation_items(err.errors(), ("query",))) from None


def parse_body(body: bytes, content_type: str | None, query: dict[str, str],
               max_values: int | None = None) -> tuple[PredictRequest, bytes | None]:
    """A predict body -> (request, raw .npy bytes or None). JSON is parsed strictly (no coercion),
    after its nesting depth and value count are checked on the bytes (``max_values``); the
    policy fields may come from the query string (an ``application/x-npy`` body's only place)."""
    mt = check_media_type(content_type)
    from_query = _query_fields(query) if query else None
    if mt == NPY:
        return from_query or PredictRequest(), body
    check_json_shape(body, max_values=max_values)
    try:
        obj = json.loads(body)
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        pos = getattr(err, "pos", None)
        raise InvalidBody([{"loc": ["body"] if pos is None else ["body", pos],
                            "msg": f"JSON decode error: {err}", "type": "json_invalid"}]) from None
    if not isinstance(obj, dict):
        raise InvalidBody([{"loc": ["body"], "msg": f"the body must be a JSON object (a dict with inputs, "
                            f"policy, ...), got a JSON {type(obj).__name__}", "type": "model_type"}])
    try:
        req = PredictRequest.model_validate(obj)
    except ValidationError as err:
        raise InvalidBody(validation_items(err.errors(), ("body",))) from None
    if from_query is None:
        return req, None
    given = from_query.model_dump(exclude_unset=True)
    both = sorted(set(given) & req.model_fields_set)
    if both:
        raise InvalidBody([{"loc": ["query", k], "msg": f"{k} is given in both the body and the query string; give "
                            "it once", "type": "duplicate_field"} for k in both])
    return req.model_copy(update=given), None


@serve.deployment(name=DEPLOYMENT)
@serve.ingress(api)
class ClientModels:
    """Every client's personal model of one run, multiplexed by client id, batched."""

    def __init__(self, cfg: ServeConfig | dict[str, Any]) -> None:
        cfg = cfg if isinstance(cfg, ServeConfig) else ServeConfig.model_validate(cfg)
        torch.set_num_threads(cfg.threads)
        self.cfg = cfg
        self.service = ModelService(cfg)
        _LIMITS["max_body_bytes"] = cfg.max_body_bytes
        self._schema: dict[str, Any] | None = None
        self._max_values = cfg.max_batch * math.prod(self.service.spec.shape) + 64  # + the other fields

        async def load(model_id: str) -> torch.nn.Module:  # client id -> personal model (cache miss)
            return await asyncio.to_thread(self.service.load_model, int(model_id))

        async def run(jobs: list[Job]) -> list[Answer | Exception]:
            models: dict[int, Any] = {}
            for cid in dict.fromkeys(j.client_id for j in jobs):
                try:
                    models[cid] = await self.get_model(str(cid))
                except Exception as err:  # noqa: BLE001 - answered to that client's requests only
                    models[cid] = err

            def get(cid: int) -> torch.nn.Module:
                m = models[cid]
                if isinstance(m, Exception):
                    raise m
                return m

            return await asyncio.to_thread(self.service.run_jobs, jobs, get)

        # Configured per instance (documented Serve pattern) so the CLI's sizes apply.
        self.get_model = serve.multiplexed(max_num_models_per_replica=cfg.max_models_per_replica)(load)
        self._batched = serve.batch(max_batch_size=cfg.batch_max_requests,
                                    batch_wait_timeout_s=cfg.batch_wait_ms / 1000)(run)

    async def _predict(self, client_id: int, req: PredictRequest, x: torch.Tensor | None = None) -> Answer:
        t0 = time.perf_counter()
        svc = self.service
        x, key = svc.validate(client_id, req, x)
        slo_ms = None
        if key[0] == SLO:  # the client's controller picks the threshold
            slo_ms = float(dict(key[1])["latency_slo_ms"])
            if svc.cached_controller(client_id, slo_ms) is None:  # first use: the client's val curve
                model = await self.get_model(str(client_id))
                await asyncio.to_thread(svc.controller, client_id, slo_ms, model)
                t0 = time.perf_counter()  # its one-time set-up is not load for the controller to react to
            key, policy, shown = svc.slo_policy(client_id, slo_ms, time.perf_counter())
        else:
            policy = svc.cached_policy(client_id, key)
            if policy is None:  # first use of this (client, policy): may calibrate or load a file
                model = await self.get_model(str(client_id))
                policy = await asyncio.to_thread(svc.policy, client_id, key, model)
            shown = svc.public_policy(policy)
        job = Job(client_id, x, key, policy, req.return_probs, shown, t0, slo_ms)
        out = await self._batched(job)
        if isinstance(out, Exception):
            raise out
        svc.finish(job, out, time.perf_counter() - t0)
        return out

    # ------------------------------------------------------------------ HTTP
    @api.post("/v1/clients/{client_id}/predict", response_model=PredictResponse, responses=_ERRORS,
              openapi_extra=_PREDICT_BODY)
    async def http_predict(self, client_id: int, request: Request) -> Response:
        """Predict a batch of samples with client `client_id`'s personal model.

        Body: JSON (`inputs` as nested lists or `inputs_b64`), or a `.npy` array with the policy
        fields in the query string."""
        header = request.headers.get(MODEL_ID_HEADER)
        if header is not None and header != str(client_id):
            raise ClientMismatch(f"URL names client {client_id} but header {MODEL_ID_HEADER} is {header!r}")
        req, npy = parse_body(await request.body(), request.headers.get("content-type"),
                              dict(request.query_params), self._max_values)
        x = None
        if npy is not None:
            self.service.check_client(client_id)
            x = decode_npy(npy, self.service.spec, self.cfg.max_batch)
        out = await self._predict(client_id, req, x)
        return Response(out.json_bytes(), media_type=JSON)

    @api.get("/v1/stats", response_model=StatsResponse, responses=_GET_ERRORS)
    async def http_stats(self) -> StatsResponse:
        """Requests, latency percentiles, MACs per sample and implied accuracy, per client and overall,
        and each latency-SLO controller's operating point (this replica's)."""
        return self.stats()

    @api.get("/v1/clients", response_model=ClientsResponse, responses=_GET_ERRORS)
    async def http_clients(self) -> ClientsResponse:
        """Client ids and their simulated device profiles."""
        return self.service.clients()

    @api.get("/v1/clients/{client_id}", response_model=ClientDetail, responses=_CLIENT_ERRORS)
    async def http_client(self, client_id: int) -> ClientDetail:
        """Input shape, exits, MACs per exit and this client's per-exit test accuracy."""
        return self.service.client_detail(client_id)

    @api.get("/v1/policies", response_model=PoliciesResponse, responses=_GET_ERRORS)
    async def http_policies(self) -> PoliciesResponse:
        """Exit policies a request may name, and the server's defaults."""
        return self.service.policies()

    @api.get("/healthz", response_model=Health, responses=_GET_ERRORS)
    async def http_health(self) -> Health:
        return self.service.health()

    @api.get("/openapi.json", include_in_schema=False)
    async def http_openapi(self, request: Request) -> JSONResponse:
        if self._schema is None:
            self._schema = openapi_schema(request.app, self.service.example_request())
        return JSONResponse(self._schema)

    @api.get("/docs", include_in_schema=False)
    async def http_docs(self, request: Request) -> HTMLResponse:
        root = str(request.scope.get("root_path", "")).rstrip("/")
        return get_swagger_ui_html(openapi_url=f"{root}/openapi.json", title=f"{api.title} - docs")

    # ------------------------------------------------------------------ handle
    async def predict(self, request: PredictRequest | dict[str, Any], client_id: int | None = None) -> PredictResponse:
        """Handle call: ``handle.options(multiplexed_model_id="3").predict.remote({"inputs": ...})``.

        Raises the same :class:`~cafe_ray.serve.core.RequestError` subclasses that HTTP maps to
        4xx statuses.
        """
        cid = client_from_model_id(client_id, serve.get_multiplexed_model_id())
        req = request if isinstance(request, PredictRequest) else PredictRequest.model_validate(request)
        return (await self._predict(cid, req)).response()

    async def clients(self) -> ClientsResponse:
        return self.service.clients()

    async def client(self, client_id: int) -> ClientDetail:
        return self.service.client_detail(client_id)

    async def policies(self) -> PoliciesResponse:
        return self.service.policies()

    async def health(self) -> Health:
        return self.service.health()

    def stats(self) -> StatsResponse:
        """``GET /v1/stats``, also a handle call: ``handle.stats.remote()``."""
        try:
            replica = serve.get_replica_context().replica_id.unique_id
        except Exception:  # noqa: BLE001 - outside a replica (tests, scripts)
            replica = "local"
        return self.service.stats_snapshot(str(replica))


GRACEFUL_SHUTDOWN_S = 2.0  # a stopping replica finishes its requests for this long (Serve's default: 20 s)


def build_app(cfg: ServeConfig) -> serve.Application:
    """The Serve application for ``cfg`` (not started): ``serve.run(build_app(cfg))``.

    ``cfg.autoscale`` (min, max) replaces the fixed ``replicas`` with Serve's autoscaling on
    ongoing requests per replica (``target_ongoing_requests``): queue length, which is what a
    latency target is sensitive to."""
    scale: dict[str, Any] = {"num_replicas": cfg.replicas}
    if cfg.autoscale is not None:
        lo, hi = cfg.autoscale
        scale = {"autoscaling_config": {"min_replicas": lo, "max_replicas": hi, "initial_replicas": max(lo, 1),
                                        "target_ongoing_requests": cfg.target_ongoing_requests,
                                        "upscale_delay_s": 3.0, "downscale_delay_s": 30.0}}
    return ClientModels.options(
        **scale,
        max_ongoing_requests=cfg.max_ongoing_requests,
        ray_actor_options={"num_cpus": cfg.replica_cpus},
        logging_config={"enable_access_log": cfg.access_log},
        graceful_shutdown_timeout_s=GRACEFUL_SHUTDOWN_S,
        graceful_shutdown_wait_loop_s=0.5,
    ).bind(cfg)


def stop(app_name: str, own_ray: bool, timeout_s: float = 2.0) -> None:
    """Stop serving within a few seconds: on a cluster, delete only ``app_name``; on the local Ray
    this process started, give Serve ``timeout_s`` to stop gracefully, then end Ray and every
    process of its session (Serve's own shutdown waits up to 30 s for its controller)."""
    import ray

    if not ray.is_initialized():
        return
    if not own_ray:
        serve.delete(app_name)
        return
    from ray.serve.context import _get_global_client

    from cafe_ray.sim.engine import shutdown_ray_if_started

    try:
        client = _get_global_client(raise_if_no_controller_running=False)
        if client is not None:
            client.shutdown(timeout_s=timeout_s)
    finally:
        shutdown_ray_if_started()


class ProxyConflict(ValueError):
    """Serve's HTTP proxy already runs on this cluster with other host/port than asked for."""


def running_proxy() -> tuple[str, int]:
    """(host, port) Serve's HTTP proxy on the connected cluster really listens on (Serve running)."""
    from ray.serve.context import _get_global_client

    http = _get_global_client().http_config
    return str(http.host), int(http.port)


def start(cfg: ServeConfig, address: str | None = None, *,
          require: frozenset[str] | set[str] = frozenset({"host", "port"})) -> DeploymentHandle:
    """Check the run, start Ray (if needed) and Serve's HTTP proxy on ``cfg.host:cfg.port``, deploy.

    Returns the deployment handle. Serve cannot change its HTTP options while it runs: if its
    proxy already runs on this cluster with another host or port, a field named in ``require``
    raises :class:`ProxyConflict` (before deploying anything) with how to use or restart it;
    a field not in ``require`` follows the running proxy. :func:`running_proxy` says where it
    really listens.
    """
    from cafe_ray.runs import RunArtifacts
    from cafe_ray.sim.engine import ensure_ray

    RunArtifacts(cfg.run_dir)  # fail here, clearly, rather than in a replica that Serve retries
    learned_paths(cfg.learned)
    ensure_ray(address)
    serve.start(http_options={"host": cfg.host, "port": cfg.port},
                logging_config={"enable_access_log": cfg.access_log})
    host, port = running_proxy()
    differ = [f for f, want, got in (("host", cfg.host, host), ("port", cfg.port, port)) if want != got]
    bad = [f for f in differ if f in require]
    if bad:
        asked = ", ".join(f"--{f} {getattr(cfg, f)}" for f in bad)
        where = "" if address is None else f"address={address!r}"
        raise ProxyConflict(
            f"Serve's HTTP proxy on this Ray cluster already listens on {host}:{port} "
            f"({server_url(host, port)}), and Ray Serve cannot change that while it runs, so {asked} would not "
            f"take effect. Either use the running proxy: run again without {' / '.join(f'--{f}' for f in bad)} "
            f"(or with {' '.join(f'--{f} {v}' for f, v in (('host', host), ('port', port)) if f in bad)}); "
            f"or restart Serve with the new options, which stops every Serve application on the cluster: "
            f"python -c \"import ray; from ray import serve; ray.init({where}); serve.shutdown()\" "
            "and run this command again.")
    return serve.run(build_app(cfg), name=cfg.app_name, route_prefix=cfg.route_prefix, blocking=False)
