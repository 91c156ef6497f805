"""LR schedules, parameter groups, optimizers, losses, EMA and clipping against hand-computed values.

Expected values are written out from MindCV's formulas here, independently of ``optim.py``.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from shufflenetv2 import create_model
from shufflenetv2.config import Config, ConfigError
from shufflenetv2.optim import (
    ModelEMA,
    build_loss,
    build_optimizer,
    clip_gradients,
    lr_batch_note,
    lr_schedule,
    lr_span_note,
    param_groups,
    set_lr,
    unwrap_model,
)


def cfg_with(**values: object) -> Config:
    return dataclasses.replace(Config(), **values)


# ---------------------------------------------------------------- schedules


def test_x0_5_recipe_schedule() -> None:
    cfg = cfg_with(scheduler="cosine_decay", lr=0.35, min_lr=0.0, warmup_epochs=4, decay_epochs=246, epoch_size=250)
    lrs = lr_schedule(cfg, steps_per_epoch=10)
    assert len(lrs) == 2500
    assert lrs[0] == 0.0
    assert lrs[20] == pytest.approx(0.175)  # epoch 2 of 4 of warmup
    assert lrs[39] == pytest.approx(0.35 * 3.9 / 4)
    assert lrs[40] == pytest.approx(0.35)  # end of warmup: the cosine's peak
    assert lrs[40 + 1230] == pytest.approx(0.175)  # half-way through the 246 decay epochs
    assert lrs[-1] == pytest.approx(0.5 * 0.35 * (1 + math.cos(math.pi * 245.9 / 246)))
    assert 0 < lrs[-1] < 1e-5
    after = lrs[40:]
    assert all(a >= b for a, b in itertools.pairwise(after))
    warmup = lrs[:41]
    assert all(a < b for a, b in itertools.pairwise(warmup))


@pytest.mark.parametrize("stair", [False, True])
def test_warmup_factor_and_stair(stair: bool) -> None:
    cfg = cfg_with(scheduler="constant", lr=1.0, warmup_epochs=2, warmup_factor=0.1, epoch_size=4, lr_epoch_stair=stair)
    lrs = lr_schedule(cfg, steps_per_epoch=4)
    assert len(lrs) == 16

    def warm(epoch: float) -> float:
        return 0.1 + (1 - 0.1) * epoch / 2

    for step in (0, 2, 5, 7):
        epoch = step // 4 if stair else step / 4
        assert lrs[step] == pytest.approx(warm(epoch))
    assert lrs[8:] == [1.0] * 8


@pytest.mark.parametrize("stair", [False, True])
def test_cosine_cycles_with_decay(stair: bool) -> None:
    cfg = cfg_with(scheduler="warmup_cosine_decay", lr=1.0, min_lr=0.1, warmup_epochs=1, decay_epochs=2,
                   num_cycles=2, cycle_decay=0.5, epoch_size=7, lr_epoch_stair=stair)  # fmt: skip
    lrs = lr_schedule(cfg, steps_per_epoch=2)
    assert len(lrs) == 14
    # warmup: steps 0, 1 (factor 0): epoch 0 and 0.5 (stair: 0 and 0)
    assert lrs[0] == 0.0
    assert lrs[1] == pytest.approx(0.0 if stair else 0.5)
    # after warmup, step j counts from 0; each cycle is 2 epochs = 4 steps
    for j in range(12):
        cycle, within = divmod(j, 4)
        if cycle >= 2:
            expected = 0.1
        else:
            t = within // 2 if stair else within / 2
            peak = 1.0 * 0.5**cycle
            expected = 0.1 + 0.5 * (peak - 0.1) * (1 + math.cos(math.pi * t / 2))
        assert lrs[2 + j] == pytest.approx(expected), j
    assert lrs[2] == pytest.approx(1.0) and lrs[6] == pytest.approx(0.5)  # each cycle's peak
    if not stair:
        assert lrs[3] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 4)))
        assert lrs[8] == pytest.approx(0.3)  # cycle 2 half-way: 0.1 + 0.2 * (1 + cos(pi/2))
    assert lrs[10:] == [0.1] * 4


def test_step_decay() -> None:
    cfg = cfg_with(scheduler="step_decay", lr=1.0, warmup_epochs=1, decay_epochs=2, decay_rate=0.5, epoch_size=6)
    lrs = lr_schedule(cfg, steps_per_epoch=3)
    assert lrs[0] == 0.0 and lrs[1] == pytest.approx(1 / 3)  # warmup
    expected = {3: 1.0, 8: 1.0, 9: 0.5, 14: 0.5, 15: 0.25, 17: 0.25}  # step -> lr; decay epochs count after warmup
    for step, value in expected.items():
        assert lrs[step] == pytest.approx(value), step


def test_multi_step_decay_counts_milestones_after_warmup() -> None:
    cfg = cfg_with(scheduler="multi_step_decay", lr=1.0, warmup_epochs=1, decay_rate=0.1,
                   multi_step_decay_milestones=(2, 1), epoch_size=5)  # fmt: skip
    lrs = lr_schedule(cfg, steps_per_epoch=2)
    # absolute epoch 1 = post-warmup epoch 0: lr; post-warmup epoch 1: one milestone passed; 2+: two
    assert lrs[2:4] == pytest.approx([1.0, 1.0])
    assert lrs[4:6] == pytest.approx([0.1, 0.1])
    assert lrs[6:] == pytest.approx([0.01] * 4)


def test_constant_with_and_without_warmup() -> None:
    assert lr_schedule(cfg_with(scheduler="constant", lr=0.2, warmup_epochs=0, epoch_size=2), 3) == [0.2] * 6
    lrs = lr_schedule(cfg_with(scheduler="constant", lr=0.2, warmup_epochs=1, epoch_size=2), 2)
    assert lrs == pytest.approx([0.0, 0.1, 0.2, 0.2])


@pytest.mark.parametrize("min_lr", [0.0, 0.05])
def test_linear_decay_ends_at_min_lr(min_lr: float) -> None:
    cfg = cfg_with(scheduler="linear_decay", lr=0.5, min_lr=min_lr, warmup_epochs=0, epoch_size=3)
    lrs = lr_schedule(cfg, steps_per_epoch=4)
    assert len(lrs) == 12
    for i in range(12):
        assert lrs[i] == pytest.approx(0.5 + (min_lr - 0.5) * i / 11)
    assert lrs[0] == 0.5 and lrs[-1] == pytest.approx(min_lr)
    stair = lr_schedule(dataclasses.replace(cfg, lr_epoch_stair=True), steps_per_epoch=4)
    assert stair == pytest.approx([0.5] * 4 + [(0.5 + min_lr) / 2] * 4 + [min_lr] * 4)


def test_linear_decay_after_warmup() -> None:
    lrs = lr_schedule(cfg_with(scheduler="linear_decay", lr=1.0, min_lr=0.0, warmup_epochs=1, epoch_size=3), 2)
    assert lrs == pytest.approx([0.0, 0.5, 1.0, 2 / 3, 1 / 3, 0.0])  # warmup, then 4 steps from lr to min_lr


def test_schedule_edge_cases() -> None:
    with pytest.raises(ConfigError, match="decay_epochs"):
        lr_schedule(cfg_with(scheduler="step_decay", decay_epochs=0), 10)
    with pytest.raises(ConfigError, match="num_cycles"):
        lr_schedule(cfg_with(num_cycles=0), 10)
    with pytest.raises(ValueError, match="steps_per_epoch"):
        lr_schedule(Config(), 0)
    lrs = lr_schedule(cfg_with(scheduler="constant", lr=1.0, warmup_epochs=5, epoch_size=2), 1)
    assert lrs == pytest.approx([0.0, 0.2])  # warmup longer than the run is cut at its end


def test_set_lr_respects_lr_scale() -> None:
    a, b = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [a]}, {"params": [b], "lr_scale": 0.1}], lr=1.0)
    set_lr(opt, 0.5)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.5, 0.05])


# ---------------------------------------------------------------- parameter groups


def _counts(model: nn.Module) -> tuple[int, int, int]:
    bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    conv = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    bias = sum(m.bias is not None for m in model.modules() if isinstance(m, nn.Linear))
    return bn, conv, bias


@pytest.mark.parametrize("classifier_bias", [False, True])
@pytest.mark.parametrize("wd_filter", ["disable", "auto", "norm_and_bias"])
def test_param_groups_on_x0_5(classifier_bias: bool, wd_filter: str) -> None:
    model = create_model("shufflenet_v2_x0_5", num_classes=10, classifier_bias=classifier_bias)
    bn, conv, bias = _counts(model)
    assert bias == int(classifier_bias)
    groups = param_groups(model, 4e-5, wd_filter)
    by_name = {g["name"]: g for g in groups}
    decayed = len(by_name["decay"]["params"])
    kept = len(by_name["no_decay"]["params"]) if "no_decay" in by_name else 0
    if wd_filter == "disable":
        assert (decayed, kept) == (2 * bn + conv + 1 + bias, 0)
    elif wd_filter == "auto":  # MindSpore's default filter: only gamma/beta (norm layers) are skipped
        assert (decayed, kept) == (conv + 1 + bias, 2 * bn)
    else:
        assert (decayed, kept) == (conv + 1, 2 * bn + bias)
    assert by_name["decay"]["weight_decay"] == 4e-5
    assert all(g["params"] for g in groups)  # no empty groups
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))  # nothing lost or duplicated
    for g in groups:
        if g["name"] == "no_decay":
            assert g["weight_decay"] == 0.0
            assert all(p.ndim == 1 for p in g["params"])


def test_param_groups_skips_frozen_and_rejects_unknown_filter() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    model[0].weight.requires_grad_(False)
    groups = param_groups(model, 0.1, "auto")
    assert [len(g["params"]) for g in groups] == [1, 2]  # linear bias; BN weight and bias
    with pytest.raises(ConfigError, match="weight_decay_filter"):
        param_groups(model, 0.1, "bias")


# ---------------------------------------------------------------- optimizers


def _tiny_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 3))  # fmt: skip


@pytest.mark.parametrize("opt", ["momentum", "sgd", "nesterov", "adam", "adamw", "rmsprop"])
def test_every_optimizer_builds_and_steps(opt: str) -> None:
    model = _tiny_net()
    cfg = cfg_with(opt=opt, lr=0.1, weight_decay=1e-4, weight_decay_filter="auto")
    optimizer = build_optimizer(cfg, model)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [1e-4, 0.0]
    before = [p.detach().clone() for p in model.parameters()]
    loss_fn = build_loss(cfg, 3)
    loss_fn(model(torch.randn(4, 3, 8, 8)), torch.tensor([0, 1, 2, 0])).backward()
    set_lr(optimizer, 0.05)
    optimizer.step()
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_optimizer_config_errors() -> None:
    with pytest.raises(ConfigError, match="Nesterov"):
        build_optimizer(cfg_with(opt="nesterov", momentum=0.0), _tiny_net())
    with pytest.raises(ConfigError, match="use_nesterov"):
        build_optimizer(cfg_with(opt="adam", use_nesterov=True), _tiny_net())
    sgd = build_optimizer(cfg_with(opt="sgd", momentum=0.0), _tiny_net())
    assert sgd.param_groups[0]["momentum"] == 0.0 and not sgd.param_groups[0]["nesterov"]
    assert build_optimizer(cfg_with(opt="nesterov"), _tiny_net()).param_groups[0]["nesterov"]
    assert build_optimizer(cfg_with(opt="momentum", use_nesterov=True), _tiny_net()).param_groups[0]["nesterov"]


class _Vector(nn.Module):
    """One decayed parameter with a quadratic loss, so every step has a different gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64))
        self.x = torch.tensor([0.3, 1.5, -2.0], dtype=torch.float64)
        self.y = torch.tensor([1.0, 0.0, 2.0], dtype=torch.float64)

    def loss(self, w: torch.Tensor | None = None) -> torch.Tensor:
        w = self.weight if w is None else w
        return 0.5 * ((w * self.x - self.y) ** 2).sum()

    def grad(self, w: torch.Tensor) -> torch.Tensor:
        return (w * self.x - self.y) * self.x


LRS = (0.1, 0.05, 0.2)  # a changing lr shows where MindSpore puts it (outside the momentum buffer)


def _run_torch(opt: str, **values: object) -> torch.Tensor:
    net = _Vector()
    optimizer = build_optimizer(cfg_with(opt=opt, weight_decay_filter="disable", **values), net)
    for lr in LRS:
        optimizer.zero_grad()
        net.loss().backward()
        set_lr(optimizer, lr)
        optimizer.step()
    return net.weight.detach()


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_equals_mindspore_momentum(nesterov: bool) -> None:
    # mindspore.nn.Momentum: g = grad + wd * w (weight decay before momentum, as torch's SGD does);
    # v = momentum * v + g; w -= lr * v   (Nesterov: w -= lr * (g + momentum * v))
    wd, momentum = 0.1, 0.9
    net = _Vector()
    w, v = net.weight.detach().clone(), torch.zeros(3, dtype=torch.float64)
    for lr in LRS:
        g = net.grad(w) + wd * w
        v = momentum * v + g
        w = w - lr * (g + momentum * v if nesterov else v)
    got = _run_torch("momentum", weight_decay=wd, momentum=momentum, use_nesterov=nesterov)
    torch.testing.assert_close(got, w, rtol=1e-12, atol=1e-12)


def test_rmsprop_equals_mindspore_rmsprop() -> None:
    # mindspore.nn.RMSProp: s starts at ONE; s = d s + (1 - d) g^2; m = mom m + lr g / sqrt(s + eps); w -= m
    wd, momentum, eps, decay = 0.01, 0.9, 1e-10, 0.9
    net = _Vector()
    w = net.weight.detach().clone()
    s, m = torch.ones(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    for lr in LRS:
        g = net.grad(w) + wd * w
        s = decay * s + (1 - decay) * g * g
        m = momentum * m + lr * g / torch.sqrt(s + eps)
        w = w - m
    got = _run_torch("rmsprop", weight_decay=wd, momentum=momentum, eps=eps)
    torch.testing.assert_close(got, w, rtol=1e-12, atol=1e-12)


def test_adamw_equals_mindcv_adamw() -> None:
    # mindcv/optim/adamw.py: update = m_hat / (eps + sqrt(v_hat)) + wd * w; w -= lr * update
    wd, b1, b2, eps = 0.05, 0.9, 0.999, 1e-8
    net = _Vector()
    w = net.weight.detach().clone()
    m, v = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    for t, lr in enumerate(LRS, start=1):
        g = net.grad(w)
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        update = (m / (1 - b1**t)) / (eps + torch.sqrt(v / (1 - b2**t))) + wd * w
        w = w - lr * update
    torch.testing.assert_close(_run_torch("adamw", weight_decay=wd), w, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- losses

LOGITS = [[1.0, 2.0, 3.0], [0.5, -1.0, 2.0]]


def _log_softmax(row: list[float]) -> list[float]:
    log_z = math.log(sum(math.exp(v) for v in row))
    return [v - log_z for v in row]


def test_ce_with_smoothing_matches_hand_computation() -> None:
    s, targets = 0.1, [2, 0]
    expected = 0.0
    for row, t in zip(LOGITS, targets, strict=True):
        logp = _log_softmax(row)
        expected += (1 - s) * -logp[t] + s * -sum(logp) / 3  # MindCV's CrossEntropySmooth
    expected /= 2
    loss = build_loss(cfg_with(loss="CE", label_smoothing=s), 3)
    assert loss(torch.tensor(LOGITS), torch.tensor(targets)).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("kind", ["CE", "BCE"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_one_hot_targets_equal_index_targets(kind: str, smoothing: float) -> None:
    loss = build_loss(cfg_with(loss=kind, label_smoothing=smoothing), 3)
    logits, index = torch.tensor(LOGITS), torch.tensor([2, 0])
    one_hot = F.one_hot(index, 3).float()
    torch.testing.assert_close(loss(logits, one_hot), loss(logits, index))


def test_ce_soft_targets_from_mixup() -> None:
    s = 0.2
    soft = [[0.7, 0.0, 0.3], [0.0, 0.4, 0.6]]
    expected = 0.0
    for row, t in zip(LOGITS, soft, strict=True):
        logp = _log_softmax(row)
        expected += -sum((ti * (1 - s) + s / 3) * lp for ti, lp in zip(t, logp, strict=True))
    loss = build_loss(cfg_with(loss="CE", label_smoothing=s), 3)
    assert loss(torch.tensor(LOGITS), torch.tensor(soft)).item() == pytest.approx(expected / 2, rel=1e-6)


def test_bce_matches_hand_computation() -> None:
    s, logits = 0.2, [0.5, -1.0]
    targets = [0 * (1 - s) + s / 2, 1 * (1 - s) + s / 2]  # class 1, smoothed: [0.1, 0.9]

    def sigmoid(x: float) -> float:
        return 1 / (1 + math.exp(-x))

    terms = [
        -(t * math.log(sigmoid(x)) + (1 - t) * math.log(1 - sigmoid(x))) for x, t in zip(logits, targets, strict=True)
    ]
    expected = sum(terms) / 2  # mean over all N * C elements, as MindCV's BinaryCrossEntropySmooth
    loss = build_loss(cfg_with(loss="BCE", label_smoothing=s), 2)
    assert loss(torch.tensor([logits]), torch.tensor([1])).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("kind", ["CE", "BCE"])
def test_loss_is_float32_under_autocast(kind: str) -> None:
    loss = build_loss(cfg_with(loss=kind, label_smoothing=0.1), 3)
    logits = torch.tensor(LOGITS)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = loss(logits.bfloat16(), torch.tensor([2, 0]))
    assert value.dtype == torch.float32
    torch.testing.assert_close(value, loss(logits.bfloat16().float(), torch.tensor([2, 0])))


# ---------------------------------------------------------------- EMA


def _perturb(model: nn.Module, step: int) -> None:
    """A fake training step: new weights and new BN statistics."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1 * step)
    model.train()(torch.randn(4, 3, 8, 8))


@pytest.mark.parametrize("average_buffers", [True, False])
def test_ema_follows_mindcv_recursion(average_buffers: bool) -> None:
    model = _tiny_net()
    ema = ModelEMA(model, decay=0.9, average_buffers=average_buffers)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    float_buffers = {k for k, v in model.named_buffers() if v.is_floating_point()}
    params = {k for k, _ in model.named_parameters()}
    for k in range(1, 6):
        _perturb(model, k)
        ema.update(nn.DataParallel(model) if k % 2 else model)  # wrapped or not
        d = 0.9 * (1 - math.exp(-k / 2000))  # MindCV's warm-up decay
        for name, value in model.state_dict().items():
            if name in params or (average_buffers and name in float_buffers):
                expected[name] = expected[name] * d + value * (1 - d)
            else:
                expected[name] = value.clone()
    assert ema.updates == 5
    got = ema.module.state_dict()
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, msg=name)
    if not average_buffers:
        for name, value in model.named_buffers():
            assert torch.equal(got[name], value)
    assert torch.equal(got["1.num_batches_tracked"], model.state_dict()["1.num_batches_tracked"])
    assert not ema.module.training and not any(p.requires_grad for p in ema.module.parameters())


def test_ema_state_dict_round_trip() -> None:
    model = _tiny_net()
    ema = ModelEMA(model, decay=0.999)
    for k in range(1, 4):
        _perturb(model, k)
        ema.update(model)
    state = ema.state_dict()
    fresh = ModelEMA(_tiny_net(), decay=0.999)
    fresh.load_state_dict(state)
    assert fresh.updates == 3
    for (name, a), b in zip(ema.module.state_dict().items(), fresh.module.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    _perturb(model, 4)
    ema.update(model)
    fresh.update(model)  # the resumed copy continues identically
    for a, b in zip(ema.module.state_dict().values(), fresh.module.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_unwrap_model() -> None:
    model = _tiny_net()

    class Compiled(nn.Module):  # what torch.compile's OptimizedModule looks like from outside
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self._orig_mod = inner

    assert unwrap_model(Compiled(nn.DataParallel(model))) is model
    assert unwrap_model(model) is model


# ---------------------------------------------------------------- clipping


def test_clip_gradients() -> None:
    params = [nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(2))]
    params[0].grad = torch.tensor([3.0, 4.0, 0.0])
    params[1].grad = torch.tensor([12.0, 0.0])
    assert clip_gradients(params, cfg_with(clip_grad=False)) is None
    assert params[0].grad[0] == 3.0
    norm = clip_gradients(params, cfg_with(clip_grad=True, clip_value=1.0))
    assert norm.item() == pytest.approx(13.0)  # the norm before clipping
    after = torch.cat([p.grad for p in params]).norm().item()
    assert after <= 1.0 + 1e-6 and after == pytest.approx(1.0, rel=1e-5)


def test_lr_batch_note_says_how_to_match_the_images_per_step_lr_was_tuned_for() -> None:
    recipe = dataclasses.replace(Config(), batch_size=64, lr=0.35, min_lr=0.0, lr_global_batch=512)

    def note(world_size: int, batches_per_epoch: int = 2500, **changes: object) -> str | None:
        return lr_batch_note(dataclasses.replace(recipe, **changes), world_size, batches_per_epoch)

    one_gpu = note(1)
    assert one_gpu is not None and "tuned for 512 images per optimizer step" in one_gpu
    assert "takes 64 (64 per device x 1 device)" in one_gpu
    assert "--gradient_accumulation_steps 8 " in one_gpu and "--lr 0.04375" in one_gpu and "--min_lr" not in one_gpu
    assert "--gradient_accumulation_steps 2 " in note(4)
    assert note(8) is None  # MindCV's own setting
    assert note(1, gradient_accumulation_steps=8) is None
    assert note(1, lr_global_batch=None) is None  # MindCV's way: nothing said
    # 512 is no multiple of 48: linear scaling alone, min_lr scaled too
    odd = note(1, batch_size=48, min_lr=0.001)
    assert odd is not None and "accumulation" not in odd and "--lr 0.0328125 --min_lr 9.375e-05" in odd
    small = note(1, batches_per_epoch=7)  # an epoch of 7 batches cannot accumulate 8
    assert small is not None and "accumulation" not in small and "--lr 0.04375" in small
    assert "--lr 0.7" in (note(16) or "")  # more images per step than tuned for: scaled up


def test_lr_span_note_says_when_the_cosine_and_the_run_end_apart() -> None:
    recipe = cfg_with(scheduler="cosine_decay", lr=0.4, min_lr=0.0, epoch_size=60, warmup_epochs=2, decay_epochs=58)

    def note(**changes: object) -> str | None:
        cfg = dataclasses.replace(recipe, **changes)
        return lr_span_note(cfg, lr_schedule(cfg, 10))

    assert note() is None  # the recipe's decay ends with its run
    assert note(scheduler="warmup_cosine_decay", epoch_size=20, decay_epochs=18) is None
    short = note(epoch_size=20)  # a quick trial of the recipe: stopped high, never annealed
    last = lr_schedule(dataclasses.replace(recipe, epoch_size=20), 10)[-1]
    assert last == pytest.approx(0.4 * 0.5 * (1 + math.cos(math.pi * (18 - 0.1) / 58)))
    assert short == (
        "note: this run ends after epoch 20, before its learning-rate schedule does (warmup_epochs 2 + "
        f"decay_epochs 58 = 60): its last lr is {last:.4g} ({last / 0.4:.0%} of lr), not min_lr 0; "
        "--decay_epochs 18 ends the schedule with the run"
    )
    long = note(epoch_size=80)  # more epochs alone: 20 of them at lr 0
    assert long == (
        "note: the learning-rate schedule ends after epoch 60 (warmup_epochs 2 + decay_epochs 58 = 60), so "
        "the last 20 epochs of this 80-epoch run (61-80) train at min_lr 0 (with lr 0 they change no weight, "
        "only BatchNorm's running statistics); --decay_epochs 78 ends the schedule with the run"
    )
    one = note(epoch_size=61, min_lr=1e-5)
    assert (
        one is not None
        and "so the last epoch of this 61-epoch run trains at min_lr 1e-05;" in one
        and "lr 0" not in one
    )
    cycles = note(epoch_size=62, decay_epochs=20, num_cycles=3)  # 2 + 3 x 20 = 62: ends together
    assert cycles is None
    odd = note(epoch_size=63, decay_epochs=20, num_cycles=3)  # 61 epochs do not split into 3 cycles
    assert odd is not None and "decay_epochs 20 x num_cycles 3 = 62" in odd and "--decay_epochs" not in odd
    # runs no longer than their warmup (quick trials of MindCV's 4 + 246 epoch recipe): the warmup's share kept
    for (epochs, warmup, decay), flags in (
        ((3, 4, 246), "--warmup_epochs 0 --decay_epochs 3"),  # 4 / 250 of 3 epochs rounds to none
        ((4, 4, 246), "--warmup_epochs 0 --decay_epochs 4"),
        ((1, 4, 246), "--warmup_epochs 0 --decay_epochs 1"),
        ((3, 50, 50), "--warmup_epochs 2 --decay_epochs 1"),  # half of 3, rounded, and at least 1 to decay
        ((100, 4, 246), "--decay_epochs 96"),  # the warmup fits: as before
    ):
        trial = note(epoch_size=epochs, warmup_epochs=warmup, decay_epochs=decay)
        assert trial is not None and trial.endswith(f"; {flags} ends the schedule with the run")
        fitted = dict(zip(flags.replace("--", "").split()[::2], map(int, flags.split()[1::2]), strict=True))
        assert note(**{"epoch_size": epochs, "warmup_epochs": warmup, **fitted}) is None  # the advice works
    for other in ("constant", "step_decay", "multi_step_decay", "linear_decay"):
        assert note(scheduler=other, epoch_size=20) is None  # their length is not decay_epochs' business
