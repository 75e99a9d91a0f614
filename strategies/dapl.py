"""DAPL (Ge et al., "Domain Adaptation via Prompt Learning", TNNLS 2023), continual over domains.

Prompt for domain d and class c: [domain-agnostic context][context of domain d][class name, a
<domain> image.], so the text classifier has one row per (domain, class) pair. Defaults from the
reference (LeapLabTHU/DAPrompt, trainers/dapl.py, configs/trainers/DAPL/ep25-32-csc.yaml): 16 + 16
context vectors from N(0, 0.02), SGD lr 0.003, pseudo-label threshold 0.5.

Continual use (domain-IL, one new domain per task): each task trains the shared context and its
own domain's context; earlier domains' contexts are frozen (``freeze_old_domains``, default) or
keep training. The training softmax runs over the (domain, class) pairs of the domains seen so
far (``softmax_over: pairs``), which also teaches the domain contexts to tell domains apart, or
over the current domain's classes only, as the reference does (``domain``). At test no domain id
is given: a class's score is the max over domains of its pair logits, or their logsumexp
(``reduce: sum``, the log of the summed pair probabilities). With ``unlabeled``, tasks after the
first train without labels on zero-shot CLIP pseudo-labels ("a photo of a {}.") whose softmax
confidence reaches ``threshold``, as DAPL trains its target domain.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from clframe.clip_backbone import ClipBackbone, ClipOptions, prompt_class_names
from clframe.config import RunConfig, option
from clframe.registry import register_strategy
from clframe.text_prompts import EvalCache, PromptSlots, init_context
from clframe.scenarios.base import DOMAIN_IL, Experience
from clframe.strategies.base import Batch, ForwardOutput, Strategy, StrategyConfig, StreamInfo, TaskReport


@dataclass
class DaplConfig(StrategyConfig, ClipOptions):
    n_ctx: int = option(16, "domain-agnostic context vectors, shared by all domains", min=1)
    n_domain_ctx: int = option(16, "context vectors of each domain", min=1)
    class_specific: bool = option(False, "one domain-agnostic context per class (DAPL's CSC)")
    domain_in_prompt: bool = option(True, "end each prompt with ', a <domain> image.' as the reference does")
    softmax_over: str = option("pairs", "training softmax over the (domain, class) pairs of the domains seen so "
                               "far, or over the current domain's classes (reference)", choices=("pairs", "domain"))
    reduce: str = option("max", "class score at test from its pair logits: max, or sum (logsumexp)",
                         choices=("max", "sum"))
    freeze_old_domains: bool = option(True, "earlier domains' contexts stop training when a new domain starts")
    unlabeled: bool = option(False, "tasks after the first train on zero-shot pseudo-labels, not their labels")
    threshold: float = option(0.5, "zero-shot confidence a pseudo-label needs to count (DAPL's tau)", min=0.0)
    zeroshot_template: str = option("a photo of a {}.", "zero-shot prompt that makes the pseudo-labels")


@dataclass
class PairOutput(ForwardOutput):
    pair_logits: torch.Tensor | None = None  # [B, domains seen, classes]
    pseudo: torch.Tensor | None = None       # zero-shot probabilities [B, classes] (unlabeled tasks)


@register_strategy("dapl")
class Dapl(Strategy):
    """DAPL: domain-agnostic plus per-domain learned context in CLIP's prompt, for domain-IL."""

    config_cls = DaplConfig
    kinds = (DOMAIN_IL,)  # one context per domain
    backbone_kind = "open_clip"

    def __init__(self, config: DaplConfig, run: RunConfig, info: StreamInfo) -> None:
        super().__init__(config, run, info)
        names = prompt_class_names(info, self.name)
        domains = list(info.domain_names or [f"domain {d}" for d in range(info.n_tasks)])
        self.backbone = ClipBackbone.create(run, config, self.name)
        self.ctx = nn.Parameter(init_context(self.backbone, config.n_ctx, "",
                                             len(names) if config.class_specific else None))
        self.domain_ctx = nn.ParameterList(nn.Parameter(init_context(self.backbone, config.n_domain_ctx))
                                           for _ in domains)
        m = config.n_ctx + config.n_domain_ctx
        suffix = [", a {} image.".format(d.replace("_", " ")) if config.domain_in_prompt else "." for d in domains]
        self.prompts = PromptSlots(self.backbone, [[m, name + end] for end in suffix for name in names])
        self.zeroshot = [config.zeroshot_template.format(name) for name in names]
        self.text_cache, self.zeroshot_cache = EvalCache(), EvalCache(fixed=True)
        self.pseudo_counts = torch.zeros(3)  # kept, correct among kept, seen (this task)
        self.set_trainable(0)

    def input_spec(self) -> tuple[int, tuple[float, ...], tuple[float, ...]]:
        return self.backbone.input_spec()

    def set_trainable(self, domain: int) -> None:
        for d, ctx in enumerate(self.domain_ctx):
            ctx.requires_grad_(d == domain or (d < domain and not self.config.freeze_old_domains))

    def before_task(self, experience: Experience) -> None:
        super().before_task(experience)
        self.set_trainable(experience.task_id)
        self.pseudo_counts = torch.zeros(3, device=self.ctx.device)

    def text_features(self, n_domains: int) -> torch.Tensor:
        """[domains, classes, embed_dim] for the first ``n_domains`` domains."""
        n_classes = self.info.n_classes
        agnostic = self.ctx.expand(n_domains, n_classes, *self.ctx.shape[-2:])
        specific = torch.stack(list(self.domain_ctx[:n_domains]))[:, None].expand(-1, n_classes, -1, -1)
        ctx = torch.cat([agnostic, specific], dim=2).flatten(0, 1)  # [domains * classes, M, width]
        rows = torch.arange(n_domains * n_classes, device=ctx.device)
        return self.prompts.encode(self.backbone, ctx, rows).view(n_domains, n_classes, -1)

    def forward(self, batch: Batch) -> ForwardOutput:
        image = self.backbone.encode_image(batch.images)
        n_domains = self.task_id + 1
        text = self.text_cache.get(self.task_id, lambda: self.text_features(n_domains))
        pairs = self.backbone.logit_scale() * torch.einsum("be,dce->bdc", image, text.to(image.dtype))
        logits = pairs.amax(dim=1) if self.config.reduce == "max" else pairs.logsumexp(dim=1)
        pseudo = None
        if batch.training and self.config.unlabeled and self.task_id > 0:
            zeroshot = self.zeroshot_cache.get("all", lambda: self.backbone.encode_texts(self.zeroshot))
            pseudo = (self.backbone.logit_scale() * image @ zeroshot.t().to(image.dtype)).float().softmax(dim=1)
        return PairOutput(logits, pair_logits=pairs, pseudo=pseudo)

    def loss(self, out: PairOutput, batch: Batch, class_mask: torch.Tensor | None) -> torch.Tensor:
        pairs, labels, domain = out.pair_logits.float(), batch.labels, self.task_id
        weight = torch.ones_like(labels, dtype=pairs.dtype)
        if out.pseudo is not None:  # DAPL's target loss: confident zero-shot labels only
            confidence, labels = out.pseudo.max(dim=1)
            weight = (confidence >= self.config.threshold).to(pairs.dtype)
            kept = weight.sum()
            self.pseudo_counts += torch.stack([kept, (weight * (labels == batch.labels)).sum(),
                                               torch.full_like(kept, len(labels))])  # on device: no sync
        if self.config.softmax_over == "pairs":
            logits, target = pairs.flatten(1), domain * pairs.shape[2] + labels
        else:
            logits, target = pairs[:, domain], labels
        return (F.cross_entropy(logits, target, reduction="none") * weight).sum() / weight.sum().clamp(min=1)

    def task_report(self) -> TaskReport:
        kept, correct, seen = self.pseudo_counts.tolist()
        if not seen:
            return TaskReport()
        return TaskReport({"dapl/pseudo_kept": 100 * kept / seen, "dapl/pseudo_acc": 100 * correct / max(kept, 1)})
