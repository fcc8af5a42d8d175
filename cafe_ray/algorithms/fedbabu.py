"""FedBABU-EE: only the backbone is federated; heads stay at a shared random init.

Oh, Kim, Yun, "FedBABU: Towards Enhanced Representation for Federated Image
Classification", ICLR 2022 (arXiv:2106.06042).

Early-exit version (docs/specification.md, Baselines):
- federation: every exit head is frozen at the experiment's deterministic
  initial weights (the same on every client: the execution layer resets the
  model before each job), so only the backbone is trained (sum of per-exit CE
  through the frozen heads), uploaded and sample-weighted averaged;
- evaluation (:meth:`FedBABUEE.load_for_eval`, also what a served client
  model runs): the global backbone plus heads fine-tuned on the client's own
  training split for ``fedbabu.finetune_epochs`` epochs with the backbone frozen
  (the paper fine-tunes the whole network; the project's spec fine-tunes the
  heads). Fine-tuning is deterministic: its shuffling is seeded by the context.
Nothing is personal state: the fine-tuned heads are recomputed at every evaluation.
"""

from __future__ import annotations

from cafe_ray.algorithms.base import (
    ClientContext,
    ClientData,
    ClientOutput,
    Message,
    Params,
    load_params,
    register,
)
from cafe_ray.algorithms.fedper import FedPerEE, backbone_of
from cafe_ray.algorithms.fedrep import train_only, unfreeze
from cafe_ray.algorithms.training import local_sgd
from cafe_ray.models.base import EarlyExitNet

_TRAIN_STREAM, _FINETUNE_STREAM = 0, 0xBAB  # shuffling streams: federation, fine-tuning


@register
class FedBABUEE(FedPerEE):
    """FedBABU (arXiv:2106.06042): body aggregation during federation, head fine-tuning before eval."""

    name = "fedbabu_ee"
    personalized = True

    def client_update(
        self, model: EarlyExitNet, payload: Message, personal: Params | None, data: ClientData, ctx: ClientContext
    ) -> ClientOutput:
        """Train the backbone only; the heads keep the shared initial weights of ``model``."""
        load_params(model, payload.tensors)
        try:
            loss, seen = local_sgd(model, data, ctx, self.cfg.train, params=train_only(model, backbone=True),
                                   stream=_TRAIN_STREAM)
        finally:
            unfreeze(model)
        return ClientOutput(
            upload=Message(tensors=backbone_of(model)),
            personal=None,
            num_samples=data.num_train,
            samples_processed=seen,
            trained_depth=model.num_exits,
            metrics={"train_loss": loss},
        )

    def finetune_heads(self, model: EarlyExitNet, data: ClientData, ctx: ClientContext) -> tuple[float, int]:
        """Fine-tune every exit head on the client's training split; the backbone is frozen."""
        hp = self.cfg.algorithm.fedbabu
        if hp.finetune_epochs == 0:
            return 0.0, 0
        train = self.cfg.train.model_copy(
            update={"local_epochs": hp.finetune_epochs, "lr": hp.finetune_lr or self.cfg.train.lr}
        )
        try:
            return local_sgd(model, data, ctx, train, params=train_only(model, backbone=False),
                             stream=_FINETUNE_STREAM)
        finally:
            unfreeze(model)

    def load_for_eval(
        self, model: EarlyExitNet, payload: Message, personal: Params | None, data: ClientData, ctx: ClientContext
    ) -> None:
        """The global backbone with the initial heads fine-tuned locally (deterministic)."""
        load_params(model, payload.tensors)
        self.finetune_heads(model, data, ctx)
        model.zero_grad(set_to_none=True)
        model.eval()
