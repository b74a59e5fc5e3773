"""Mixture-of-experts feed-forward (beamvq/nn/moe.py): routing under capacity with recycling,
determinism and DDP agreement, gradients, equal active parameters, the expert learning rates,
the backbone hooks, and a ``fast_dev_run`` fit per ``configs/moe/*.yaml`` through the CLI."""

from __future__ import annotations

import math
import os
import socket
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from beamvq.backbones import Earthformer, FourCastNet
from beamvq.backbones.base import count_parameters
from beamvq.module import ForecastModule
from beamvq.nn.moe import (
    PAPER_EXPERT_LR_RATIO,
    MoEConfig,
    MoEFeedForward,
    begin_aux_collection,
    expert_capacity,
    expert_lr_ratio,
    load_balancing_loss,
    moe_layers,
    param_groups,
    pop_aux_loss,
    pop_stats,
    route,
)
from beamvq.optim import LRSchedule
from beamvq.protocols import Batch
from beamvq.tuning import lr_for_batch

ROOT = Path(__file__).resolve().parents[1]
MOE_CONFIGS = sorted((ROOT / "configs" / "moe").glob("*.yaml"))


def skewed_logits(tokens: int, experts: int, seed: int = 0) -> torch.Tensor:
    """Router logits where expert 0 is everyone's favourite (forces overflow)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(tokens, experts, generator=g)
    logits[:, 0] += 2.0
    return logits


# -- routing -------------------------------------------------------------------------------------
@pytest.mark.parametrize("factor", [1.0, 1.25, 2.0])
@pytest.mark.parametrize(("tokens", "experts"), [(64, 4), (37, 3), (128, 8)])
def test_every_token_in_exactly_one_expert_and_capacity_holds(
    tokens: int, experts: int, factor: float
) -> None:
    logits = skewed_logits(tokens, experts)
    cap = expert_capacity(tokens, experts, factor)
    r = route(logits, cap, recycle=True, generator=torch.Generator().manual_seed(0))
    # N * capacity >= T here, so nobody is dropped: one specialized expert per token
    assert bool((r.expert >= 0).all())
    counts = torch.bincount(r.expert, minlength=experts)
    assert int(counts.sum()) == tokens
    assert int(counts.max()) <= cap
    # recycled = tokens that did not get their top-1 choice, and exactly the overflow
    chosen_counts = torch.bincount(r.chosen, minlength=experts)
    overflow = int((chosen_counts - cap).clamp_min(0).sum())
    assert int(r.recycled.sum()) == overflow > 0
    assert bool((r.expert[~r.recycled] == r.chosen[~r.recycled]).all())
    assert bool((r.expert[r.recycled] != r.chosen[r.recycled]).all())


def test_highest_probability_tokens_keep_their_expert() -> None:
    logits = skewed_logits(40, 4)
    cap = expert_capacity(40, 4, 1.0)
    r = route(logits, cap, recycle=True, generator=torch.Generator().manual_seed(0))
    probs = logits.softmax(-1)
    top = probs.max(-1).values
    on_zero = r.chosen == 0
    kept = on_zero & ~r.recycled
    # every token that kept expert 0 is more confident than every token recycled away from it
    assert float(top[kept].min()) >= float(top[on_zero & r.recycled].max())
    # the gate is the router probability of the expert that processed the token
    torch.testing.assert_close(r.gate, probs.gather(-1, r.expert[:, None])[:, 0])


def test_without_recycling_overflow_is_dropped_and_with_too_little_room_too() -> None:
    logits = skewed_logits(64, 4)
    cap = expert_capacity(64, 4, 1.0)
    r = route(logits, cap, recycle=False, generator=None)
    overflow = int((torch.bincount(r.chosen, minlength=4) - cap).clamp_min(0).sum())
    assert int((r.expert < 0).sum()) == overflow and int(r.recycled.sum()) == 0
    assert bool((r.gate[r.expert < 0] == 0).all())
    # capacity 0.5: only N * cap tokens fit; recycling fills every slot, the rest is dropped
    cap = expert_capacity(64, 4, 0.5)
    r = route(logits, cap, recycle=True, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(r.expert[r.expert >= 0], minlength=4)
    assert counts.tolist() == [cap] * 4
    assert int((r.expert < 0).sum()) == 64 - 4 * cap


def test_routing_is_deterministic_under_a_seed() -> None:
    logits = skewed_logits(96, 4)
    cap = expert_capacity(96, 4, 1.0)
    a = route(logits, cap, True, torch.Generator().manual_seed(5))
    b = route(logits, cap, True, torch.Generator().manual_seed(5))
    c = route(logits, cap, True, torch.Generator().manual_seed(6))
    assert torch.equal(a.expert, b.expert)
    assert not torch.equal(a.expert, c.expert)  # the recycle draw does depend on the seed


def test_load_balancing_loss_is_one_when_balanced_and_n_when_collapsed() -> None:
    uniform = torch.full((8, 4), 0.25)
    assert float(load_balancing_loss(uniform, torch.arange(8) % 4)) == pytest.approx(1.0)
    collapsed = torch.zeros(8, 4)
    collapsed[:, 0] = 1.0
    assert float(load_balancing_loss(collapsed, torch.zeros(8, dtype=torch.long))) == 4.0


# -- the layer -----------------------------------------------------------------------------------
def layer(seed: int = 0, **kw: object) -> MoEFeedForward:
    torch.manual_seed(seed)
    return MoEFeedForward(16, 64, MoEConfig(**{"num_experts": 4, **kw}))


def test_layer_recycle_stream_depends_only_on_seed_layer_and_step() -> None:
    x = torch.randn(2, 50, 16)
    a, b = layer(capacity_factor=1.0), layer(capacity_factor=1.0)
    with torch.no_grad():
        a.router.weight[:, :] = 0
        a.router.weight[0, 0] = 5.0  # a strong favourite: overflow on every call
        b.load_state_dict(a.state_dict())
    for step in range(3):
        torch.manual_seed(100 + step)  # a different global RNG state for each layer
        ya = a(x)
        torch.manual_seed(999)
        before = torch.random.get_rng_state()
        yb = b(x)
        assert torch.equal(torch.random.get_rng_state(), before)  # the global RNG is untouched
        assert torch.equal(ya, yb)
        assert int(a.routing_step) == step + 1
    assert pop_stats(a).recycled > 0
    # another seed gives another recycle draw, same weights
    c = layer(capacity_factor=1.0, seed=0)
    c.config = MoEConfig(num_experts=4, capacity_factor=1.0, seed=1)
    c.load_state_dict(a.state_dict())
    c.routing_step.zero_()
    a.routing_step.zero_()
    assert not torch.equal(a(x), c(x))


def test_eval_is_pure_top1_and_independent_of_the_batch() -> None:
    m = layer(capacity_factor=0.25).eval()  # a capacity that would drop most tokens in training
    x = torch.randn(6, 20, 16)
    with torch.no_grad():
        full = m(x)
        alone = m(x[2:3])
    torch.testing.assert_close(full[2:3], alone, rtol=0, atol=1e-6)
    assert int(m.routing_step) == 0 and pop_stats(m) is None


def test_gradients_reach_router_shared_and_every_expert_even_without_tokens() -> None:
    m = layer(capacity_factor=1.25)
    x = torch.randn(3, 40, 16)
    begin_aux_collection(m)
    y = m(x)
    (y.square().mean() + pop_aux_loss(m, y)).backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # all tokens on expert 0 with room for all: experts 1..3 get no token, yet every parameter is
    # in the graph (zero gradient), which is what DDP needs
    m.zero_grad()
    m.config = MoEConfig(num_experts=4, capacity_factor=4.0)
    with torch.no_grad():
        m.router.weight.zero_()
        m.router.weight[0] = 1.0
    x = torch.rand(3, 40, 16) + 0.1
    m(x).sum().backward()
    assert all(p.grad is not None for p in m.parameters())
    assert float(m.experts[1].fc1.weight.grad.abs().sum()) == 0
    assert float(m.experts[0].fc1.weight.grad.abs().sum()) > 0


def test_active_parameters_match_the_dense_mlp() -> None:
    dim, hidden, n = 16, 64, 4
    m = MoEFeedForward(dim, hidden, MoEConfig(num_experts=n))
    dense = 2 * dim * hidden + hidden + dim
    shared = count_parameters(m.shared)
    one_expert = count_parameters(m.experts[0])
    router = count_parameters(m.router)
    assert shared + one_expert + router == dense + dim * (n + 1)
    assert count_parameters(m) == shared + n * one_expert + router


def test_stats_shares_and_aux_loss_hooks() -> None:
    m = layer(capacity_factor=1.0)
    x = torch.randn(2, 30, 16)
    assert float(pop_aux_loss(m, x)) == 0.0  # nothing collected before a step starts
    begin_aux_collection(m)
    m(x)
    m(x)
    aux = pop_aux_loss(m, x)
    stats = pop_stats(m)
    assert stats is not None and pop_stats(m) is None  # read once
    assert float(stats.tokens) == 120
    assert float(stats.expert_share.sum() + stats.dropped) == pytest.approx(1.0)
    assert float(aux.detach()) == pytest.approx(0.01 * float(stats.aux_loss), rel=1e-5)
    assert float(pop_aux_loss(m, x)) == 0.0  # consumed
    logs = stats.log_values()
    assert set(logs) == {*(f"moe/expert_share/{e}" for e in range(4)), "moe/recycled",
                         "moe/dropped", "moe/aux_loss"}  # fmt: skip


# -- learning rates ------------------------------------------------------------------------------
def test_expert_lr_ratio_rules() -> None:
    surge = MoEConfig(num_experts=16, expert_lr="surge")
    assert expert_lr_ratio(surge, 64, b_noise=256.0) == pytest.approx(
        lr_for_batch(64 / 16, 64, 1.0, 256.0)
    )
    # config.b_noise wins over the module's
    own = MoEConfig(num_experts=16, b_noise=32.0)
    assert expert_lr_ratio(own, 64, b_noise=256.0) == pytest.approx(lr_for_batch(4, 64, 1.0, 32.0))
    # no B_noise: the rule's small-batch limit, sqrt(1/N)
    assert expert_lr_ratio(surge, 64) == pytest.approx(0.25)
    assert expert_lr_ratio(MoEConfig(num_experts=16, expert_lr="paper"), 64) == 0.31
    assert PAPER_EXPERT_LR_RATIO == 0.31
    assert expert_lr_ratio(MoEConfig(expert_lr="dense"), 64) == 1.0


def test_param_groups_and_the_optimizer_learning_rates() -> None:
    torch.manual_seed(0)
    model = FourCastNet(2, 1, 1, 1, height=8, width=8, patch_size=4, embed_dim=16, depth=2,
                        encoder_depth=1, num_blocks=4, moe=MoEConfig(num_experts=4))  # fmt: skip
    groups = param_groups(model, 1e-3, batch_size=32, b_noise=64.0)
    assert [g["name"] for g in groups] == ["dense", "experts"]
    ratio = lr_for_batch(8, 32, 1.0, 64.0)
    assert groups[0]["lr"] == 1e-3 and groups[1]["lr"] == pytest.approx(1e-3 * ratio)
    experts = {id(p) for layer in moe_layers(model) for p in layer.experts.parameters()}
    assert {id(p) for p in groups[1]["params"]} == experts
    every = [id(p) for g in groups for p in g["params"]]
    assert sorted(every) == sorted(id(p) for p in model.parameters())  # each exactly once
    opt = torch.optim.AdamW(groups, lr=1.0)
    assert [g["lr"] for g in opt.param_groups] == [1e-3, pytest.approx(1e-3 * ratio)]
    # without MoE: one group holding every parameter
    dense = FourCastNet(2, 1, 1, 1, height=8, width=8, patch_size=4, embed_dim=16, depth=1,
                        encoder_depth=1, num_blocks=4)  # fmt: skip
    (only,) = param_groups(dense, 1e-3, 32)
    assert len(only["params"]) == len(list(dense.parameters()))


def test_config_errors_name_the_yaml_key() -> None:
    with pytest.raises(ValueError, match=r"moe.num_experts must be >= 1"):
        MoEConfig(num_experts=0)
    with pytest.raises(ValueError, match=r"moe.expert_lr must be one of"):
        MoEConfig(expert_lr="fast")
    with pytest.raises(ValueError, match=r"moe.capacity_factor must be > 0"):
        MoEConfig(capacity_factor=0)
    with pytest.raises(ValueError, match=r"moe.shared_fraction"):
        MoEConfig(shared_fraction=1.0)


# -- the backbones -------------------------------------------------------------------------------
def tiny(cls: type, moe: MoEConfig | None) -> torch.nn.Module:
    torch.manual_seed(0)
    if cls is FourCastNet:
        return FourCastNet(3, 2, 1, 1, height=16, width=16, patch_size=4, embed_dim=16, depth=2,
                           encoder_depth=1, num_blocks=4, moe=moe)  # fmt: skip
    return Earthformer(3, 2, 1, 1, height=16, width=16, base_units=16, num_heads=4,
                       stem_dims=[8, 16], stem_downscales=[2, 1], moe=moe)  # fmt: skip


@pytest.mark.parametrize("cls", [FourCastNet, Earthformer])
def test_backbone_hooks_train_every_moe_layer(cls: type) -> None:
    model = tiny(cls, MoEConfig(num_experts=3, aux_loss_weight=0.1)).train()
    layers = moe_layers(model)
    assert layers and [m.layer_id for m in layers] == list(range(len(layers)))
    x, y = torch.randn(2, 3, 1, 16, 16), torch.randn(2, 2, 1, 16, 16)
    model.begin_training_step(y, 0.0)
    pred = model(x)
    extra = model.extra_loss(pred, y)
    assert float(extra) > 0
    ((pred - y).square().mean() + extra).backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None]
    assert dead == []
    logs = model.training_log_values()
    assert set(logs) >= {"moe/recycled", "moe/dropped", "moe/expert_share/2"}
    assert model.training_log_values() == {}  # read once per step
    # dense: zero extra loss, nothing to log
    dense = tiny(cls, None)
    dense.begin_training_step(y, 0.0)
    assert float(dense.extra_loss(dense(x), y)) == 0.0 and dense.training_log_values() == {}


# -- DDP: every rank routes the same way ---------------------------------------------------------
def _ddp_worker(rank: int, port: int, out_dir: str) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = os.environ.get("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    torch.manual_seed(rank)  # different weights and global RNG per rank before DDP broadcasts
    m = MoEFeedForward(8, 32, MoEConfig(num_experts=4, capacity_factor=1.0, seed=3))
    ddp = torch.nn.parallel.DistributedDataParallel(m)  # broadcasts rank 0's parameters
    g = torch.Generator().manual_seed(42)
    x = torch.randn(64, 8, generator=g)  # the same input on both ranks
    routes, outputs = [], []
    for step in range(3):
        torch.manual_seed(1000 * rank + step)  # the global RNG differs between the ranks
        # the routing this step's forward uses: replicated weights, input, seed, layer, step
        routes.append(route(m.router(x), 16, True, m.generator()).expert)
        y = ddp(x)
        outputs.append(y.detach())
        y.square().mean().backward()
    gathered = {}
    for name, local in (("routes", torch.stack(routes)), ("outputs", torch.stack(outputs))):
        both = [torch.zeros_like(local) for _ in range(2)]
        dist.all_gather(both, local)
        gathered[name] = both
    if rank == 0:
        torch.save(gathered, Path(out_dir) / "routes.pt")
    # Drop DDP (its reducer holds the process group) before tearing gloo down: were the group
    # destroyed when the reducer is garbage-collected, gloo's worker thread could free a tensor
    # (which needs the GIL) while the main thread, holding the GIL, joins it: a deadlock seen
    # here about once in eight runs.
    dist.barrier()
    del ddp, gathered, both
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow  # two processes
def test_two_gloo_ranks_route_identically(tmp_path: Path) -> None:
    mp.spawn(_ddp_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    gathered = torch.load(tmp_path / "routes.pt")
    rank0, rank1 = gathered["routes"]
    assert torch.equal(rank0, rank1)
    assert not torch.equal(rank0[0], rank0[1])  # the step counter moves the recycle draw
    assert torch.equal(*gathered["outputs"])


# -- the CLI -------------------------------------------------------------------------------------
@pytest.mark.parametrize("config", MOE_CONFIGS, ids=lambda p: p.stem)
def test_moe_config_fast_dev_run(
    config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, figures_not_rendered: list[Path]
) -> None:
    # the quickstart's report callbacks run, their matplotlib rendering is skipped (conftest.py):
    # it was most of the run's time and has nothing to do with the experts
    from beamvq.cli import main
    from beamvq.datamodules.synthetic import write_navier_stokes

    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["beamvq"])
    data = {"n_trajectories": 6, "resolution": 32, "n_frames": 12}
    path = write_navier_stokes(tmp_path / "ns32.nc", **data)
    gen = "--data.init_args.generator.init_args"
    cli = main([
        "fit",
        "--config", str(ROOT / "configs" / "quickstart.yaml"),
        "--config", str(config),
        "--trainer.fast_dev_run", "true",
        "--trainer.logger", "false",
        "--trainer.default_root_dir", str(tmp_path / "run"),
        "--data.init_args.path", str(path),
        "--data.init_args.loader.batch_size", "2",
        *(a for k, v in data.items() for a in (f"{gen}.{k}", str(v))),
        "--model.backbone.init_args.height", "32",
        "--model.backbone.init_args.width", "32",
    ])  # fmt: skip
    backbone = cli.model.model.backbone
    assert cli.trainer.state.finished and cli.trainer.global_step == 1
    layers = moe_layers(backbone)
    assert layers and all(m.config.num_experts == 4 for m in layers)
    assert all(int(m.routing_step) >= 1 for m in layers)  # every MoE layer ran in training
    assert math.isfinite(float(cli.trainer.callback_metrics["train/loss"]))


# -- the forecast module's integration: loss term, logs, expert parameter groups -----------------
class _Windows(pl.LightningDataModule):
    batch_size = 4

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        g = torch.Generator().manual_seed(0)
        items = [
            Batch(
                torch.randn(3, 1, 16, 16, generator=g),
                torch.randn(2, 1, 16, 16, generator=g),
                torch.tensor(1.0),
                torch.tensor(i),
            )  # fmt: skip
            for i in range(8)
        ]
        return torch.utils.data.DataLoader(items, batch_size=self.batch_size)


def test_forecast_module_trains_moe_with_expert_groups_and_logs(tmp_path: Path) -> None:
    backbone = tiny(FourCastNet, MoEConfig(num_experts=4, expert_lr="paper"))
    module = ForecastModule(backbone, lr_schedule=LRSchedule(scheduler="none"))
    trainer = pl.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_progress_bar=False,
                         enable_checkpointing=False, enable_model_summary=False,
                         default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(module, datamodule=_Windows())
    (opt,) = trainer.optimizers
    experts = {id(p) for m in backbone.modules() if isinstance(m, MoEFeedForward)
               for p in m.experts.parameters()}  # fmt: skip
    # the dense parameters, then one group per MoE layer holding its specialized experts
    n_layers = sum(isinstance(m, MoEFeedForward) for m in backbone.modules())
    assert len(opt.param_groups) == 1 + n_layers >= 3
    dense, *expert_groups = opt.param_groups
    assert {id(p) for g in expert_groups for p in g["params"]} == experts
    assert not experts & {id(p) for p in dense["params"]}
    assert dense["lr"] == pytest.approx(1e-3)
    assert all(g["lr"] == pytest.approx(1e-3 * PAPER_EXPERT_LR_RATIO) for g in expert_groups)
    logged = trainer.callback_metrics
    assert float(logged["train/backbone_extra"]) > 0  # the load-balancing term is in the loss
    assert {"moe/recycled", "moe/dropped", "moe/expert_share/0"} <= set(logged)
    assert pop_stats(backbone) is None  # the module read every step's statistics


def test_bf16_autocast_and_large_seeds() -> None:
    m = MoEFeedForward(16, 64, MoEConfig(num_experts=4, capacity_factor=1.0, seed=2**40))
    x = torch.randn(2, 30, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
    assert y.dtype == torch.bfloat16 and y.shape == x.shape
    y.float().square().mean().backward()
    assert m.router.weight.grad is not None
