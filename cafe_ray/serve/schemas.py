"""The HTTP JSON API's request and response models (they also make the OpenAPI schema).

Exits are numbered both ways in every answer: ``exit`` is 1-based (exit 1 is the first,
cheapest one; ``exit == num_exits`` is full depth), ``exit_index`` is 0-based, as in
:class:`cafe_ray.inference.Prediction` and the rest of the library.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class PredictRequest(BaseModel):
    """A batch of samples for one client's personal model, and how deep to run them.

    Strict: JSON types are not coerced (``"0.7"`` is not a number, ``"yes"`` not a boolean),
    unknown fields and non-finite numbers are rejected. The OpenAPI example is built by the
    server from its model's real input shape.
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)

    inputs: list[Any] | None = Field(None, min_length=1, description=(
        "Samples as nested lists of shape (batch, *input_shape): floats (C, H, W) for image datasets, "
        "integer token ids (L,) for text ones. GET /v1/clients/{client_id} gives input_shape. "
        "At most the server's max_batch samples (more: 413). Give exactly one of inputs and inputs_b64."))
    inputs_b64: str | None = Field(None, min_length=1, description=(
        "The samples as base64 of their raw little-endian bytes in input_dtype (float32 for images, int64 "
        "for text token ids), C order, batch first: the batch size is the byte length over one sample's. "
        "About 4x smaller and much faster to decode than nested lists."))
    policy: str | None = Field(None, min_length=1, description=(
        "Exit policy: one of GET /v1/policies (full, threshold, entropy, budget, learned, ...). "
        "Default: the server's (threshold)."))
    threshold: float | None = Field(None, ge=0, le=1, description=(
        "policy=threshold: exit at the first exit whose max softmax probability reaches this. "
        "Default: the server's (0.6)."))
    max_entropy: float | None = Field(None, ge=0, description=(
        "policy=entropy: exit at the first exit whose prediction entropy (nats) is at most this."))
    mac_budget: float | None = Field(None, gt=0, description=(
        "MACs per sample. policy=budget: a threshold calibrated on the client's val split so that mean "
        "MACs per sample stay within it (default: the client's device profile inference_mac_budget). "
        "policy=learned: an RL policy's budget_left feature sees it; a `policy fit` policy is calibrated "
        "on the client's val split to it (default: its saved operating point)."))
    return_probs: bool = Field(False, description="Also return the class probabilities at the exit taken.")
    latency_slo_ms: float | None = Field(None, gt=0, le=3_600_000, description=(
        "A p99 latency target for this client's requests: the server moves the exit threshold along the "
        "client's validation accuracy-vs-MACs curve so that its p99 stays under it, never below the server's "
        "accuracy floor, and back toward full depth when load drops. Only with policy threshold (or none) and "
        "no threshold. Default: the server's --latency-slo-ms for requests that name no policy."))


class ErrorItem(BaseModel):
    """One thing wrong with a request (the shape FastAPI uses for validation errors)."""

    loc: list[str | int] = Field(description="Where: e.g. [\"body\", \"threshold\"], [\"path\", \"client_id\"], "
                                             "[\"header\", \"content-type\"].")
    msg: str = Field(description="What is wrong, the value, and what is accepted.")
    type: str = Field(description="Machine-readable error kind, e.g. float_type, unknown_client, body_too_large.")


class ErrorResponse(BaseModel):
    """Every 4xx answer of this API: ``detail`` is always a list of errors."""

    detail: list[ErrorItem]


class SamplePrediction(BaseModel):
    label: int = Field(description="Predicted class (argmax at the exit taken).")
    exit: int = Field(description="Exit taken, 1-based (num_exits = full depth).")
    exit_index: int = Field(description="Exit taken, 0-based (exit - 1).")
    confidence: float = Field(description="Max softmax probability at the exit taken.")
    macs: int = Field(description="MACs spent on this sample: every stage and exit head it ran (cascade).")
    probs: list[float] | None = Field(None, description="Class probabilities at the exit taken (return_probs).")


class PredictResponse(BaseModel):
    client_id: int
    policy: dict[str, Any] = Field(description="The policy that ran, with its parameters.")
    num_exits: int
    full_macs: int = Field(description="MACs of a sample that runs to the last exit (every stage and head).")
    mean_macs: float = Field(description="Mean of macs over this batch.")
    predictions: list[SamplePrediction]


class ClientSummary(BaseModel):
    client_id: int
    profile: dict[str, Any] = Field(description="The client's simulated device profile.")


class ClientsResponse(BaseModel):
    count: int
    clients: list[ClientSummary]


class ExitInfo(BaseModel):
    exit: int = Field(description="1-based exit number.")
    exit_index: int = Field(description="0-based exit number.")
    stage_macs: int = Field(description="MACs of the backbone stage before this exit.")
    head_macs: int = Field(description="MACs of this exit's head.")
    macs: int = Field(description="MACs of an answer at this exit: stages and heads up to it (cascade).")
    test_accuracy: float | None = Field(description="This client's test accuracy at this exit, from the "
                                                    "run's last evaluation (null if never evaluated).")


class ClientDetail(BaseModel):
    client_id: int
    profile: dict[str, Any]
    input_shape: list[int] = Field(description="Shape of one sample; a request sends (batch, *input_shape).")
    input_dtype: str = Field(description="float32 (image) or int64 (text token ids).")
    num_classes: int
    classes: list[str]
    num_exits: int
    full_macs: int
    exits: list[ExitInfo]


class PoliciesResponse(BaseModel):
    available: list[str]
    default: str
    defaults: dict[str, Any] = Field(description="Parameters used when a request gives none.")
    learned: str | None = Field(description="The learned policy the server was started with, if any: its "
                                            "name relative to the run directory (or its file name).")


class LatencyStats(BaseModel):
    requests: int = Field(description="Requests answered since the replica started.")
    samples: int
    p50_ms: float | None = Field(description="Over the most recent requests (a window of up to 4,096).")
    p95_ms: float | None
    p99_ms: float | None
    queue_p99_ms: float | None = Field(description="p99 of the time a request waited before its model call.")
    mean_macs: float | None = Field(description="Mean MACs per sample over the recent window.")
    implied_accuracy: float | None = Field(description="Validation accuracy implied by the operating points the "
                                                       "recent samples ran at (threshold, full and SLO requests; "
                                                       "null when none of those).")


class OperatingPointInfo(BaseModel):
    latency_slo_ms: float
    index: int = Field(description="0: the most accurate point (full depth or a threshold as accurate); higher: "
                                   "cheaper.")
    points: int = Field(description="Points on this client's curve above the accuracy floor.")
    threshold: float | None = Field(description="Exit threshold now in use (null: full depth).")
    val_accuracy: float = Field(description="The client's validation accuracy at this point.")
    macs_per_sample: float = Field(description="Mean MACs per sample at this point on the validation split.")
    moves: int = Field(description="Moves since the controller started.")


class ClientStats(LatencyStats):
    client_id: int
    operating_points: list[OperatingPointInfo] = Field(description="One per latency target in use.")


class StatsResponse(BaseModel):
    replica: str = Field(description="The replica that answered (each replica counts its own requests).")
    uptime_s: float
    overall: LatencyStats
    clients: list[ClientStats]
    stage_ms_per_sample: list[float] | None = Field(description="The replica's estimate of each stage's (and exit "
                                                                "head's) service time per sample.")


class Health(BaseModel):
    status: str
    run: str = Field(description="The run directory's name (never a server path).")
    algorithm: str
    dataset: str
    round: int
    clients: int
