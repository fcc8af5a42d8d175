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
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve

from cafe_ray.serve.config import ServeConfig
from cafe_ray.serve.core import ClientMismatch, Job, RequestError, client_from_model_id
from cafe_ray.serve.schemas import (
    ClientDetail,
    ClientsResponse,
    Health,
    PoliciesResponse,
    PredictRequest,
    PredictResponse,
)
from cafe_ray.serve.service import ModelService, learned_paths

MODEL_ID_HEADER = "serve_multiplexed_model_id"
DEPLOYMENT = "ClientModels"

_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "The serve_multiplexed_model_id header names another client than the URL."},
    404: {"description": "Unknown client id."},
    413: {"description": "More samples than the server's max_batch."},
    422: {"description": "Malformed JSON, wrong input shape or dtype, NaN/infinite values, unknown policy "
                         "or a parameter out of range (the detail says which and what is accepted)."},
}

api = FastAPI(
    title="cafe-ray serving",
    version="1",
    description="Personalized early-exit models of a cafe-ray run: one model per client, each sample run "
                "only as deep as its exit policy decides. Exits are numbered 1-based (`exit`) and 0-based "
                "(`exit_index`); MACs count every stage and exit head a sample ran.",
)


@api.exception_handler(RequestError)
async def _request_error(request: Request, err: RequestError) -> JSONResponse:
    return JSONResponse(status_code=err.status_code, content={"detail": str(err)})


@serve.deployment(name=DEPLOYMENT)
@serve.ingress(api)
class ClientModels:
    """Every client's personal model of one run, multiplexed by client id, batched."""

    def __init__(self, cfg: ServeConfig | dict[str, Any]) -> None:  # noqa: UP007
        cfg = cfg if isinstance(cfg, ServeConfig) else ServeConfig.model_validate(cfg)
        torch.set_num_threads(cfg.threads)
        self.cfg = cfg
        self.service = ModelService(cfg)

        async def load(model_id: str) -> torch.nn.Module:  # client id -> personal model (cache miss)
            return await asyncio.to_thread(self.service.load_model, int(model_id))

        async def run(jobs: list[Job]) -> list[PredictResponse | Exception]:
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

    async def _predict(self, client_id: int, req: PredictRequest) -> PredictResponse:
        svc = self.service
        x, key = svc.validate(client_id, req)
        policy = svc.cached_policy(client_id, key)
        if policy is None:  # first use of this (client, policy): may calibrate or load a file
            model = await self.get_model(str(client_id))
            policy = await asyncio.to_thread(svc.policy, client_id, key, model)
        out = await self._batched(Job(client_id, x, key, policy, req.return_probs))
        if isinstance(out, Exception):
            raise out
        return out

    # ------------------------------------------------------------------ HTTP
    @api.post("/v1/clients/{client_id}/predict", response_model=PredictResponse, responses=_ERRORS)
    async def http_predict(self, client_id: int, body: PredictRequest, request: Request) -> PredictResponse:
        """Predict a batch of samples with client `client_id`'s personal model."""
        header = request.headers.get(MODEL_ID_HEADER)
        if header is not None and header != str(client_id):
            raise ClientMismatch(f"URL names client {client_id} but header {MODEL_ID_HEADER} is {header!r}")
        return await self._predict(client_id, body)

    @api.get("/v1/clients", response_model=ClientsResponse)
    async def http_clients(self) -> ClientsResponse:
        """Client ids and their simulated device profiles."""
        return self.service.clients()

    @api.get("/v1/clients/{client_id}", response_model=ClientDetail, responses={404: _ERRORS[404]})
    async def http_client(self, client_id: int) -> ClientDetail:
        """Input shape, exits, MACs per exit and this client's per-exit test accuracy."""
        return self.service.client_detail(client_id)

    @api.get("/v1/policies", response_model=PoliciesResponse)
    async def http_policies(self) -> PoliciesResponse:
        """Exit policies a request may name, and the server's defaults."""
        return self.service.policies()

    @api.get("/healthz", response_model=Health)
    async def http_health(self) -> Health:
        return self.service.health()

    # ------------------------------------------------------------------ handle
    async def predict(self, request: PredictRequest | dict[str, Any], client_id: int | None = None) -> PredictResponse:
        """Handle call: ``handle.options(multiplexed_model_id="3").predict.remote({"inputs": ...})``.

        Raises the same :class:`~cafe_ray.serve.core.RequestError` subclasses that HTTP maps to
        4xx statuses.
        """
        cid = client_from_model_id(client_id, serve.get_multiplexed_model_id())
        req = request if isinstance(request, PredictRequest) else PredictRequest.model_validate(request)
        return await self._predict(cid, req)

    async def clients(self) -> ClientsResponse:
        return self.service.clients()

    async def client(self, client_id: int) -> ClientDetail:
        return self.service.client_detail(client_id)

    async def policies(self) -> PoliciesResponse:
        return self.service.policies()

    async def health(self) -> Health:
        return self.service.health()


def build_app(cfg: ServeConfig):  # noqa: ANN201 - a ray.serve Application
    """The Serve application for ``cfg`` (not started): ``serve.run(build_app(cfg))``."""
    return ClientModels.options(
        num_replicas=cfg.replicas,
        max_ongoing_requests=cfg.max_ongoing_requests,
        ray_actor_options={"num_cpus": cfg.replica_cpus},
    ).bind(cfg)


def start(cfg: ServeConfig, address: str | None = None):  # noqa: ANN201 - a DeploymentHandle
    """Check the run, start Ray (if needed) and Serve's HTTP proxy on ``cfg.host:cfg.port``, deploy.

    Returns the deployment handle; the HTTP API is at ``cfg.url``. If Serve already runs on this
    Ray cluster, its HTTP options stay as they are (Serve cannot change them while running).
    """
    from cafe_ray.runs import RunArtifacts
    from cafe_ray.sim.engine import ensure_ray

    RunArtifacts(cfg.run_dir)  # fail here, clearly, rather than in a replica that Serve retries
    learned_paths(cfg.learned)
    ensure_ray(address)
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    return serve.run(build_app(cfg), name=cfg.app_name, route_prefix=cfg.route_prefix, blocking=False)
