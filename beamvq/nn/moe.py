"""Mixture-of-experts feed-forward with a shared expert and recycle routing (Hunyuan-Large).

Sun et al., *Hunyuan-Large: An Open-Source MoE Model with 52 Billion Activated Parameters by
Tencent* (arXiv 2411.02265): every token passes through one **shared expert** and through one of
``N`` **specialized experts** chosen by top-1 routing; each specialized expert takes at most
``capacity`` tokens per call, and **recycle routing** sends a token whose expert is full to a
randomly chosen specialized expert that still has room, instead of dropping it. The specialized
experts get their own learning rate: each one sees about ``1/N`` of the tokens, so its effective
batch is about ``B/N`` and the Surge rule (Li et al. 2024, arXiv 2405.14578; ``beamvq.tuning``)
gives its best Adam learning rate relative to the dense one. Load balancing uses the Switch
Transformer auxiliary loss (Fedus et al. 2021, arXiv 2101.03961), ``N Σ_e f_e P_e``, with
``f_e`` the share of tokens whose top-1 choice is ``e`` and ``P_e`` the mean router probability
of ``e`` (1 when balanced).

Our choices (the paper leaves them open or works at another scale):

- **Equal active parameters.** With a dense MLP of hidden width ``H``, the shared expert gets
  ``round(shared_fraction · H)`` hidden units and every specialized expert the rest (the paper's
  shared and specialized experts have equal size: ``shared_fraction = 0.5``). A token then
  meets ``2·dim·H + H`` weights, as in the dense MLP, plus one more output bias (``dim``) and the
  router (``dim·N``): ``dim·(N + 1)`` more active parameters than the dense block.
- **Output** ``shared(x) + g · expert_e(x)``, ``g`` the router probability of the expert that
  processed the token (recycled tokens use the probability of their new expert, so the router
  still gets a gradient; dropped tokens get only the shared expert).
- **Capacity in training only**: ``capacity = ceil(capacity_factor · T / N)`` for the ``T``
  tokens of one call. Tokens claim their chosen expert in order of router probability (highest
  first). In evaluation no capacity applies (pure top-1): a sample's forecast then never depends
  on the other samples of its batch, which the batched beam search relies on.
- **Determinism and DDP.** Recycling draws from a private ``torch.Generator`` seeded from
  ``seed``, the layer's index and a per-layer step counter (a buffer, so it travels in
  checkpoints and resumes the same stream). Routing therefore depends only on the layer's
  weights and input plus state that every DDP rank holds identically; the global RNG is neither
  read nor advanced. Every expert runs on every call (on zero tokens if none are routed to it), so
  every parameter is in the graph and DDP never sees an unused parameter.
- **Expert learning rate** (:func:`expert_lr_ratio`): ``"surge"`` transfers the dense learning
  rate tuned at the global batch ``B`` to ``B/N`` with ``beamvq.tuning.lr_for_batch``; without a
  ``B_noise`` it uses the rule's ``B ≪ B_noise`` limit (square-root scaling, ``1/√N``).
  ``"paper"`` is Hunyuan-Large's operational ratio of about 0.31 for its 16 experts with top-1
  routing (:data:`PAPER_EXPERT_LR_RATIO`); ``"dense"`` keeps the dense rate (ratio 1).

The module calls three helpers (see ``Backbone``'s training hooks): :func:`begin_aux_collection`
before a training step's forward, :func:`pop_aux_loss` for the loss term and :func:`pop_stats`
for the logs, plus :func:`param_groups` in ``configure_optimizers``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from beamvq.nn.attention import Mlp
from beamvq.tuning import lr_for_batch

#: Hunyuan-Large's learning-rate ratio of a specialized expert to the dense/shared one (16
#: specialized experts, top-1), as the issue quotes it; selectable as ``expert_lr: paper``.
PAPER_EXPERT_LR_RATIO: float = 0.31
EXPERT_LR_RULES = ("surge", "paper", "dense")

#: the YAML key of these settings, named in every message
_KEY = "model.backbone.init_args.moe"


@dataclass(frozen=True)
class MoEConfig:
    """The mixture-of-experts option of a backbone's token-wise MLP blocks (YAML: ``moe:``).

    Args:
        num_experts: specialized experts ``N`` (top-1 routing among them).
        capacity_factor: each expert takes at most ``ceil(capacity_factor · T / N)`` of a call's
            ``T`` tokens in training; ``>= 1`` lets recycling place every token.
        recycle: send a token whose expert is full to a random expert with room (Hunyuan's
            recycle routing); ``False`` drops it (shared expert only), as Switch/GShard.
        aux_loss_weight: weight of the load-balancing loss (0 turns it off).
        expert_lr: ``"surge"``, ``"paper"`` or ``"dense"``: the specialized experts' learning
            rate relative to the dense one (see the module docstring).
        b_noise: gradient noise scale (in samples) for the Surge rule; ``None`` takes the
            module's ``lr_b_noise``, and without one the rule's small-batch limit ``1/√N``.
        shared_fraction: share of the dense hidden width given to the shared expert; the
            specialized experts get the rest (equal active parameters).
        seed: seed of the recycle draws (the same on every DDP rank).
    """

    num_experts: int = 4
    capacity_factor: float = 1.25
    recycle: bool = True
    aux_loss_weight: float = 0.01
    expert_lr: str = "surge"
    b_noise: float | None = None
    shared_fraction: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        problems = []
        if self.num_experts < 1:
            problems.append(f"{_KEY}.num_experts must be >= 1, got {self.num_experts}")
        if not self.capacity_factor > 0:
            problems.append(f"{_KEY}.capacity_factor must be > 0, got {self.capacity_factor}")
        if self.aux_loss_weight < 0:
            problems.append(f"{_KEY}.aux_loss_weight must be >= 0, got {self.aux_loss_weight}")
        if self.expert_lr not in EXPERT_LR_RULES:
            problems.append(
                f"{_KEY}.expert_lr must be one of {EXPERT_LR_RULES}, got {self.expert_lr!r}"
            )
        if self.b_noise is not None and not self.b_noise > 0:
            problems.append(f"{_KEY}.b_noise must be > 0 or null, got {self.b_noise}")
        if not 0 < self.shared_fraction < 1:
            problems.append(f"{_KEY}.shared_fraction must be in (0, 1), got {self.shared_fraction}")
        if problems:
            raise ValueError("; ".join(problems))


class Routing(NamedTuple):
    """Where each of ``T`` tokens goes: ``expert`` (``-1`` = dropped), its gate, the top-1
    choice, whether it was recycled, and the load-balancing loss of the call."""

    expert: Tensor
    gate: Tensor
    chosen: Tensor
    recycled: Tensor
    aux_loss: Tensor


class MoEStats(NamedTuple):
    """Routing statistics over the calls since the last read (what the module logs).

    ``expert_share``: share of the tokens each specialized expert processed, ``(N,)``;
    ``recycled`` / ``dropped``: shares of tokens recycled / given to no specialized expert;
    ``aux_loss``: mean load-balancing loss; ``tokens``: number of tokens counted.
    """

    expert_share: Tensor
    recycled: Tensor
    dropped: Tensor
    aux_loss: Tensor
    tokens: Tensor

    def log_values(self, prefix: str = "moe") -> dict[str, Tensor]:
        """Flat ``{name: scalar}`` for ``LightningModule.log_dict``."""
        values = {f"{prefix}/expert_share/{e}": s for e, s in enumerate(self.expert_share)}
        values[f"{prefix}/recycled"] = self.recycled
        values[f"{prefix}/dropped"] = self.dropped
        values[f"{prefix}/aux_loss"] = self.aux_loss
        return values


def expert_capacity(num_tokens: int, num_experts: int, capacity_factor: float) -> int:
    """``ceil(capacity_factor · T / N)``: the most tokens one expert takes in a call."""
    return max(1, math.ceil(capacity_factor * num_tokens / num_experts))


def load_balancing_loss(probs: Tensor, chosen: Tensor) -> Tensor:
    """Switch Transformer's ``N Σ_e f_e P_e`` over router probabilities ``(T, N)``."""
    n = probs.shape[-1]
    f = torch.bincount(chosen, minlength=n).to(probs.dtype) / max(1, chosen.numel())
    return n * (f * probs.mean(0)).sum()


def route(
    logits: Tensor, capacity: int | None, recycle: bool, generator: torch.Generator | None
) -> Routing:
    """Top-1 routing of ``(T, N)`` router logits under a per-expert ``capacity`` (``None``: none).

    Tokens claim their top-1 expert in order of router probability (stable for ties); those past
    ``capacity`` overflow. With ``recycle`` the overflow tokens, in the same order, take the free
    slots left (``capacity`` minus what each expert kept) in an order drawn from ``generator``
    (so an expert with more room is proportionally likelier); tokens left when no slot remains are
    dropped. Nothing is dropped while ``N · capacity >= T``.
    """
    probs = logits.float().softmax(-1)
    top_p, chosen = probs.max(-1)
    aux = load_balancing_loss(probs, chosen)
    n_tokens, n_experts = probs.shape
    no = torch.zeros(n_tokens, dtype=torch.bool, device=probs.device)
    if capacity is None or capacity >= n_tokens:
        return Routing(chosen, top_p, chosen, no, aux)
    order = torch.argsort(top_p, descending=True, stable=True)
    one_hot = F.one_hot(chosen[order], n_experts)
    position = (one_hot.cumsum(0) * one_hot).sum(-1) - 1  # rank of the token within its expert
    kept_sorted = position < capacity
    expert = torch.full_like(chosen, -1)
    expert[order[kept_sorted]] = chosen[order[kept_sorted]]
    recycled = no.clone()
    overflow = order[~kept_sorted]
    if recycle and overflow.numel():
        kept_counts = torch.bincount(chosen[order[kept_sorted]], minlength=n_experts)
        free = (capacity - kept_counts).clamp_min(0).cpu()
        slots = torch.repeat_interleave(torch.arange(n_experts), free)
        slots = slots[torch.randperm(slots.numel(), generator=generator)]
        n = min(overflow.numel(), slots.numel())
        expert[overflow[:n]] = slots[:n].to(expert.device)
        recycled[overflow[:n]] = True
    processed = expert >= 0
    gate = torch.where(
        processed, probs.gather(-1, expert.clamp_min(0)[:, None])[:, 0], probs.new_zeros(())
    )
    return Routing(expert, gate, chosen, recycled, aux)


class MoEFeedForward(nn.Module):
    """Shared expert + ``N`` top-1 specialized experts, a drop-in for a token-wise MLP.

    Args:
        dim: token width (input and output).
        hidden: hidden width of the dense MLP this replaces (split between shared and
            specialized experts so active parameters match, see the module docstring).
        config: the :class:`MoEConfig`.
        dropout: dropout inside every expert (as the dense MLP it replaces).
    """

    def __init__(self, dim: int, hidden: int, config: MoEConfig, dropout: float = 0.0) -> None:
        super().__init__()
        shared_hidden = max(1, round(config.shared_fraction * hidden))
        expert_hidden = max(1, hidden - shared_hidden)
        self.config = config
        self.num_experts = config.num_experts
        self.layer_id = 0  # set by number_moe_layers once the backbone is built
        self.shared = Mlp(dim, shared_hidden, dropout=dropout)
        self.router = nn.Linear(dim, config.num_experts, bias=False)
        self.experts = nn.ModuleList(
            Mlp(dim, expert_hidden, dropout=dropout) for _ in range(config.num_experts)
        )
        self.register_buffer("routing_step", torch.zeros((), dtype=torch.long))
        self.collect_aux = False
        self.pending_aux: list[Tensor] = []
        self._stats: list[Tensor] | None = None  # summed counts since the last pop_stats

    def generator(self) -> torch.Generator:
        """The recycle generator of this call: seed, layer index and step, nothing else."""
        seed = (int(self.config.seed) * 1_000_003 + self.layer_id) * 1_000_003
        return torch.Generator().manual_seed((seed + int(self.routing_step)) % 2**63)

    def forward(self, x: Tensor) -> Tensor:
        tokens = x.reshape(-1, x.shape[-1])
        capacity = None
        generator = None
        if self.training:
            capacity = expert_capacity(
                tokens.shape[0], self.num_experts, self.config.capacity_factor
            )
            generator = self.generator()
            self.routing_step += 1
        routing = route(self.router(tokens), capacity, self.config.recycle, generator)
        out = self.shared(tokens)
        for e, expert in enumerate(self.experts):
            # every expert runs, on zero tokens if needed, so all parameters are in the graph
            idx = (routing.expert == e).nonzero()[:, 0]
            update = expert(tokens[idx])
            update = update * routing.gate[idx, None].to(update.dtype)
            out = out.index_add(0, idx, update.to(out.dtype))  # dtypes differ under autocast
        if self.training:
            self._record(routing)
        return out.reshape(x.shape)

    def _record(self, routing: Routing) -> None:
        if self.collect_aux:
            self.pending_aux.append(routing.aux_loss)
        processed = routing.expert[routing.expert >= 0]
        counts = [
            torch.bincount(processed, minlength=self.num_experts).float(),
            routing.recycled.sum().float(),
            (routing.expert < 0).sum().float(),
            routing.aux_loss.detach() * routing.expert.numel(),
            torch.tensor(float(routing.expert.numel()), device=routing.expert.device),
        ]
        if self._stats is None:
            self._stats = counts
        else:
            self._stats = [a + b for a, b in zip(self._stats, counts)]

    def pop_counts(self) -> list[Tensor] | None:
        """The summed counts since the last call (and reset)."""
        counts, self._stats = self._stats, None
        return counts


def moe_layers(module: nn.Module) -> list[MoEFeedForward]:
    """Every :class:`MoEFeedForward` inside ``module``, in module order."""
    return [m for m in module.modules() if isinstance(m, MoEFeedForward)]


def number_moe_layers(module: nn.Module) -> None:
    """Give each MoE layer its index (it seeds the layer's recycle stream)."""
    for i, layer in enumerate(moe_layers(module)):
        layer.layer_id = i


def begin_aux_collection(module: nn.Module) -> None:
    """Start of a training step: record each MoE layer's load-balancing loss from now on."""
    for layer in moe_layers(module):
        layer.collect_aux = True
        layer.pending_aux = []


def pop_aux_loss(module: nn.Module, like: Tensor) -> Tensor:
    """``aux_loss_weight ×`` the mean load-balancing loss over the layers' calls since
    :func:`begin_aux_collection`; stops collecting. A zero scalar (dtype/device of ``like``)
    without MoE layers or calls."""
    total, count = like.new_zeros(()), 0
    for layer in moe_layers(module):
        for aux in layer.pending_aux:
            total = total + layer.config.aux_loss_weight * aux.to(like.dtype)
            count += 1
        layer.pending_aux = []
        layer.collect_aux = False
    return total / max(1, count)


def pop_stats(module: nn.Module) -> MoEStats | None:
    """Routing statistics of every MoE layer since the last call, token-weighted; ``None``
    without MoE layers or training calls."""
    sums: list[Tensor] | None = None
    for layer in moe_layers(module):
        counts = layer.pop_counts()
        if counts is None:
            continue
        if sums is not None and sums[0].shape != counts[0].shape:
            raise ValueError("pop_stats: MoE layers with different num_experts in one model")
        sums = counts if sums is None else [a + b for a, b in zip(sums, counts)]
    if sums is None:
        return None
    per_expert, recycled, dropped, aux, tokens = sums
    return MoEStats(per_expert / tokens, recycled / tokens, dropped / tokens, aux / tokens, tokens)


def expert_lr_ratio(config: MoEConfig, batch_size: int, b_noise: float | None = None) -> float:
    """Learning rate of a specialized expert over the dense one (see the module docstring).

    ``batch_size``: the global batch ``B`` in samples the dense rate is for; ``b_noise``: the
    module's ``lr_b_noise`` (``config.b_noise`` wins when set).
    """
    if config.expert_lr == "dense":
        return 1.0
    if config.expert_lr == "paper":
        return PAPER_EXPERT_LR_RATIO
    noise = config.b_noise if config.b_noise is not None else b_noise
    effective = batch_size / config.num_experts
    if noise is None:
        # The Surge rule for B << B_noise is square-root scaling (beamvq.tuning's docstring).
        return math.sqrt(effective / batch_size)
    return lr_for_batch(effective, batch_size, 1.0, noise)


def param_groups(
    module: nn.Module, lr: float, batch_size: int, b_noise: float | None = None
) -> list[dict[str, Any]]:
    """Optimizer parameter groups: the specialized experts of each MoE layer at
    ``lr × expert_lr_ratio``, everything else (shared experts, routers too) at ``lr``.

    Without MoE layers: one group with every parameter (the same optimizer as ``parameters()``).
    Groups carry a ``name`` (``"dense"``, ``"experts"``) for logging.
    """
    ratios: dict[float, list[nn.Parameter]] = {}
    expert_ids: set[int] = set()
    for layer in moe_layers(module):
        ratio = expert_lr_ratio(layer.config, batch_size, b_noise)
        params = list(layer.experts.parameters())
        ratios.setdefault(ratio, []).extend(params)
        expert_ids.update(id(p) for p in params)
    # the order of module.parameters(): without MoE the optimizer is exactly today's
    dense = [p for p in module.parameters() if id(p) not in expert_ids]
    groups: list[dict[str, Any]] = [{"params": dense, "lr": lr, "name": "dense"}]
    for i, (ratio, params) in enumerate(sorted(ratios.items())):
        name = "experts" if len(ratios) == 1 else f"experts_{i}"
        groups.append({"params": params, "lr": lr * ratio, "name": name})
    return groups


__all__ = [
    "EXPERT_LR_RULES",
    "PAPER_EXPERT_LR_RATIO",
    "MoEConfig",
    "MoEFeedForward",
    "MoEStats",
    "Routing",
    "begin_aux_collection",
    "expert_capacity",
    "expert_lr_ratio",
    "load_balancing_loss",
    "moe_layers",
    "number_moe_layers",
    "param_groups",
    "pop_aux_loss",
    "pop_stats",
    "route",
]
