"""DER++ and DER (Buzzega et al., NeurIPS 2020; mammoth ``models/derpp.py``, ``models/der.py``).

The reservoir buffer also keeps the logits the model gave each image when it went in. A step
draws two independent buffer batches, as the reference does: the first is pulled towards its
stored logits, the second is classified with its labels::

    loss = CE(current) + alpha * MSE(logits(replay_1), stored logits) + beta * CE(replay_2)

``der`` is DER++ with beta = 0 (and draws only the first batch). The stored logits cover every
class of the stream, as the reference's network output does (including classes not seen yet).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from clframe.config import option
from clframe.registry import register_strategy
from clframe.strategies.base import Batch, ForwardOutput, Replay
from clframe.strategies.er import ER, ERConfig


@dataclass
class DerppConfig(ERConfig):
    alpha: float = option(0.1, "weight of the MSE between replayed logits and the stored ones", min=0.0)
    beta: float = option(0.5, "weight of the cross-entropy on the second replayed batch (0 = DER)", min=0.0)


@dataclass
class DerConfig(ERConfig):
    alpha: float = option(0.3, "weight of the MSE between replayed logits and the stored ones", min=0.0)
    beta: float = option(0.0, "DER has no label term; use --strategy derpp for one", min=0.0)


@register_strategy("derpp")
class Derpp(ER):
    """DER++: logit replay (alpha) and label replay (beta) from one reservoir buffer."""

    config_cls = DerppConfig
    keep_logits = True

    def replay(self, n_current: int) -> Replay | None:
        first = self.buffer.sample(self.replay_count())
        if first is None or not self.config.beta:
            return first
        second = self.buffer.sample(self.replay_count())
        return Replay(torch.cat([first.images, second.images]), torch.cat([first.labels, second.labels]),
                      torch.cat([first.logits, second.logits]))

    def loss_terms(self, out: ForwardOutput, batch: Batch, class_mask: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """The three terms, unweighted: current CE, replay MSE, replay CE (zero without replay)."""
        logits = out.logits.float()
        masked = logits if class_mask is None else logits.masked_fill(~class_mask, float("-inf"))
        n = batch.n_current if batch.n_current is not None else len(batch.labels)
        zero = logits.new_zeros(())
        terms = {"ce": F.cross_entropy(masked[:n], batch.labels[:n]), "mse": zero, "replay_ce": zero}
        if batch.replay is not None:
            m = len(batch.replay.labels) // 2 if self.config.beta else len(batch.replay.labels)
            terms["mse"] = F.mse_loss(logits[n:n + m], batch.replay.logits[:m].float())
            if self.config.beta:
                terms["replay_ce"] = F.cross_entropy(masked[n + m:], batch.labels[n + m:])
        return terms

    def loss(self, out: ForwardOutput, batch: Batch, class_mask: torch.Tensor | None) -> torch.Tensor:
        terms = self.loss_terms(out, batch, class_mask)
        loss = terms["ce"] + self.config.alpha * terms["mse"] + self.config.beta * terms["replay_ce"]
        if out.extra_loss is not None:
            loss = loss + out.extra_loss
        n = batch.n_current if batch.n_current is not None else len(batch.labels)
        self.buffer.add_reservoir(self.current_rows(batch), batch.labels[:n], self.task_id, out.logits[:n])
        return loss


@register_strategy("der")
class Der(Derpp):
    """DER: logit replay only (DER++ with beta = 0)."""

    config_cls = DerConfig
