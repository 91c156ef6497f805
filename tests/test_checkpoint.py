"""Run checkpoints: complete pairs only, exact weights, safe state loading, MindCV's keep policies, RNG."""

from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from shufflenetv2 import CheckpointError, create_model, read_weights
from shufflenetv2.checkpoint import (
    CheckpointKeeper,
    CheckpointRef,
    checkpoint_ref,
    list_checkpoints,
    load_state,
    remove_checkpoint,
    remove_partial_files,
    resolve_resume,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from shufflenetv2.fileio import atomic_path

from .conftest import calibrated

MODEL = "shufflenet_v2_x0_5"


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return calibrated(create_model(MODEL, num_classes=3), seed=3)


def _state(epoch: int = 1, **extra) -> dict:
    return {"epoch": epoch, "global_step": 10 * epoch, **extra}


def _fake(directory: Path, epoch: int, step: int = 10, model_name: str = MODEL) -> CheckpointRef:
    """A complete checkpoint as far as the listing and the keeper can tell (both files present)."""
    ref = checkpoint_ref(directory, model_name, epoch, step)
    directory.mkdir(parents=True, exist_ok=True)
    ref.state.write_bytes(b"state")
    ref.weights.write_bytes(b"weights")
    return ref


def _epochs(directory: Path) -> list[int]:
    return [r.epoch for r in list_checkpoints(directory, MODEL)]


def _leftovers(directory: Path) -> list[str]:
    names = [p.name for p in directory.iterdir() if p.name != ".run.lock"]  # the lock names the run: not left over
    return sorted(name for name in names if name.endswith(".tmp") or name.startswith("."))


# --- save and list --------------------------------------------------------------------------------


def test_save_checkpoint_writes_both_files(tmp_path: Path, model: torch.nn.Module) -> None:
    ref = checkpoint_ref(tmp_path / "ckpt", MODEL, 3, 50)
    save_checkpoint(ref, model, _state(3), source="epoch 3")
    assert ref.weights == tmp_path / "ckpt" / f"{MODEL}-3_50.safetensors"
    assert ref.state == tmp_path / "ckpt" / f"{MODEL}-3_50.state.pt"
    assert ref.weights.is_file() and ref.state.is_file()
    assert _leftovers(tmp_path / "ckpt") == []
    assert list_checkpoints(tmp_path / "ckpt") == [ref]
    assert read_weights(ref.weights).metadata["source"] == "epoch 3"


def test_weights_round_trip_exactly(tmp_path: Path, model: torch.nn.Module) -> None:
    ref = checkpoint_ref(tmp_path, MODEL, 1, 7)
    save_checkpoint(ref, model, _state())
    weights = read_weights(ref.weights)
    expected = model.state_dict()
    assert set(weights.tensors) == set(expected)
    for key, tensor in expected.items():
        assert weights.tensors[key].dtype == tensor.dtype, key
        assert torch.equal(weights.tensors[key], tensor), key
    assert weights.arch["num_classes"] == 3 and weights.arch["model"] == MODEL

    again = create_model(MODEL, num_classes=3)
    again.load_state_dict(weights.tensors)  # strict: the file fits the architecture it names
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), expected.values(), strict=True))


def test_list_ignores_incomplete_and_foreign_files(tmp_path: Path) -> None:
    a = _fake(tmp_path, 2)
    b = _fake(tmp_path, 1, 99)
    (tmp_path / f"{MODEL}-3_10.safetensors").write_bytes(b"w")  # weights without state
    (tmp_path / f"{MODEL}-4_10.state.pt").write_bytes(b"s")  # state without weights (crash mid-save)
    (tmp_path / f"{MODEL}_best.safetensors").write_bytes(b"w")  # the best-weights file is not a checkpoint
    (tmp_path / f"{MODEL}-2_10_ema.safetensors").write_bytes(b"w")  # nor is the EMA copy
    (tmp_path / "notes.txt").write_text("hi")
    other = _fake(tmp_path, 5, model_name="shufflenet_v2_x1_0")
    assert list_checkpoints(tmp_path, MODEL) == [b, a]
    assert list_checkpoints(tmp_path) == [b, a, other]
    assert list_checkpoints(tmp_path / "missing") == []


def test_list_sorts_by_epoch_then_step_numerically(tmp_path: Path) -> None:
    refs = [_fake(tmp_path, e, s) for e, s in [(10, 5), (2, 300), (9, 1), (2, 40), (10, 12), (1, 1000)]]
    listed = list_checkpoints(tmp_path, MODEL)
    assert [(r.epoch, r.step) for r in listed] == [(1, 1000), (2, 40), (2, 300), (9, 1), (10, 5), (10, 12)]
    assert set(listed) == set(refs)


def test_remove_checkpoint_takes_every_file(tmp_path: Path) -> None:
    ref = _fake(tmp_path, 1)
    ref.ema.write_bytes(b"ema")
    keep = _fake(tmp_path, 2)
    remove_checkpoint(ref)
    assert not ref.weights.exists() and not ref.state.exists() and not ref.ema.exists()
    assert keep.weights.exists() and keep.state.exists()
    remove_checkpoint(ref)  # already gone: no error


# --- training state -------------------------------------------------------------------------------


def test_load_state_round_trip(tmp_path: Path) -> None:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.randn(4, 3))], lr=0.1, momentum=0.9)
    opt.param_groups[0]["params"][0].grad = torch.ones(4, 3)
    opt.step()
    state = _state(4, optimizer=opt.state_dict(), ema=None, best_top1=0.5, rng=[rng_state()], config={"lr": 0.1})
    ref = checkpoint_ref(tmp_path, MODEL, 4, 40)
    save_checkpoint(ref, create_model(MODEL, num_classes=3), state)
    loaded = load_state(ref.state)
    assert loaded["epoch"] == 4 and loaded["global_step"] == 40 and loaded["best_top1"] == 0.5
    momentum = opt.state_dict()["state"][0]["momentum_buffer"]
    assert torch.equal(loaded["optimizer"]["state"][0]["momentum_buffer"], momentum)
    assert loaded["config"] == {"lr": 0.1}


class _Payload:
    """Not a tensor or a plain container: a weights_only load must refuse it."""


def test_load_state_is_weights_only(tmp_path: Path) -> None:
    path = tmp_path / "evil.state.pt"
    torch.save(_state(payload=_Payload()), path)
    assert isinstance(torch.load(path, weights_only=False)["payload"], _Payload)  # a full unpickle would run it
    with pytest.raises(CheckpointError, match=re.escape(str(path))):
        load_state(path)


def test_truncated_state(tmp_path: Path) -> None:
    path = tmp_path / "a.state.pt"
    torch.save(_state(extra=torch.randn(1000)), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_state(path)


@pytest.mark.parametrize("data", [b"", b"garbage" * 10, b"PK\x03\x04 not really a zip"])
def test_garbage_state(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "a.state.pt"
    path.write_bytes(data)
    with pytest.raises(CheckpointError, match=r"a\.state\.pt"):
        load_state(path)


def test_missing_state_mentions_resume_opt(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="resume_opt"):
        load_state(tmp_path / "gone.state.pt")


@pytest.mark.parametrize("obj", [[1, 2], {"global_step": 3}, torch.zeros(2)])
def test_state_that_is_not_ours(tmp_path: Path, obj: object) -> None:
    path = tmp_path / "x.state.pt"
    torch.save(obj, path)
    with pytest.raises(CheckpointError, match="not a training state"):
        load_state(path)


# --- resume ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".safetensors", ".state.pt", ""])
def test_resolve_resume_accepts_any_form(tmp_path: Path, suffix: str) -> None:
    ref = checkpoint_ref(tmp_path / "run", MODEL, 12, 345)
    resolved = resolve_resume(str(tmp_path / "run" / f"{MODEL}-12_345{suffix}"))
    assert resolved == ref
    assert (resolved.epoch, resolved.step) == (12, 345)
    assert resolved.weights == ref.weights and resolved.state == ref.state


def test_resolve_resume_with_a_foreign_name(tmp_path: Path) -> None:
    resolved = resolve_resume(str(tmp_path / "my_weights.safetensors"))
    assert resolved.weights == tmp_path / "my_weights.safetensors"
    assert resolved.state == tmp_path / "my_weights.state.pt"
    assert (resolved.epoch, resolved.step) == (0, 0)


def test_resolve_then_load(tmp_path: Path, model: torch.nn.Module) -> None:
    ref = checkpoint_ref(tmp_path, MODEL, 2, 20)
    save_checkpoint(ref, model, _state(2))
    assert load_state(resolve_resume(str(ref.weights)).state)["epoch"] == 2


# --- keep policies --------------------------------------------------------------------------------


def test_latest_k_keeps_the_newest(tmp_path: Path) -> None:
    keeper = CheckpointKeeper(tmp_path, MODEL, "latest_k", keep=3)
    all_refs = []
    for epoch in range(1, 7):
        ref = _fake(tmp_path, epoch)
        ref.ema.write_bytes(b"ema")
        all_refs.append(ref)
        dropped = keeper.add(ref, score=None)
        assert dropped == ([all_refs[epoch - 4]] if epoch > 3 else [])
        assert _epochs(tmp_path) == list(range(max(1, epoch - 2), epoch + 1))
    for old in all_refs[:3]:  # every file of a dropped checkpoint is gone
        assert not old.weights.exists() and not old.state.exists() and not old.ema.exists()
    for kept in all_refs[3:]:
        assert kept.weights.exists() and kept.state.exists() and kept.ema.exists()
    assert _leftovers(tmp_path) == []


def test_latest_k_orders_by_step_within_an_epoch(tmp_path: Path) -> None:
    keeper = CheckpointKeeper(tmp_path, MODEL, "latest_k", keep=2)
    for step in (100, 20, 300):
        keeper.add(_fake(tmp_path, 5, step), None)
    assert [r.step for r in list_checkpoints(tmp_path, MODEL)] == [100, 300]


def test_latest_k_leaves_other_models_alone(tmp_path: Path) -> None:
    other = _fake(tmp_path, 1, model_name="shufflenet_v2_x2_0")
    keeper = CheckpointKeeper(tmp_path, MODEL, "latest_k", keep=1)
    for epoch in (1, 2, 3):
        keeper.add(_fake(tmp_path, epoch), None)
    assert _epochs(tmp_path) == [3]
    assert other.weights.exists() and other.state.exists()


def test_top_k_keeps_the_best(tmp_path: Path) -> None:
    keeper = CheckpointKeeper(tmp_path, MODEL, "top_k", keep=3)
    scores = {1: 0.30, 2: 0.50, 3: 0.40, 4: 0.60, 5: 0.55, 6: 0.70}
    for epoch, score in scores.items():
        keeper.add(_fake(tmp_path, epoch), score)
    assert _epochs(tmp_path) == [4, 5, 6]  # 0.60, 0.55, 0.70
    index = json.loads((tmp_path / "checkpoints.json").read_text())
    assert index == {"scores": {f"{MODEL}-{e}_10": scores[e] for e in (4, 5, 6)}, "interim": []}


def test_top_k_never_deletes_the_one_just_given(tmp_path: Path) -> None:
    keeper = CheckpointKeeper(tmp_path, MODEL, "top_k", keep=2)
    keeper.add(_fake(tmp_path, 1), 0.9)
    keeper.add(_fake(tmp_path, 2), 0.8)
    worst = _fake(tmp_path, 3)
    assert keeper.add(worst, 0.1) == []  # worse than both, yet it is where a resume starts
    assert worst.weights.exists() and worst.state.exists()
    assert _epochs(tmp_path) == [1, 2, 3]
    dropped = keeper.add(_fake(tmp_path, 4), 0.2)  # the next one replaces it; the best two stay
    assert [r.epoch for r in dropped] == [3]
    assert _epochs(tmp_path) == [1, 2, 4]
    keeper.add(_fake(tmp_path, 5), 0.95)
    assert _epochs(tmp_path) == [1, 5]


def test_latest_k_never_deletes_the_one_just_given(tmp_path: Path) -> None:
    """Resumed from an earlier epoch, a later checkpoint already on disk does not push the new one out."""
    keeper = CheckpointKeeper(tmp_path, MODEL, "latest_k", keep=1)
    keeper.add(_fake(tmp_path, 9), None)
    given = _fake(tmp_path, 4)
    assert keeper.add(given, None) == []
    assert given.weights.exists() and given.state.exists()


def test_top_k_ties_keep_the_earlier(tmp_path: Path) -> None:
    keeper = CheckpointKeeper(tmp_path, MODEL, "top_k", keep=2)
    for epoch in (1, 2):
        keeper.add(_fake(tmp_path, epoch), 0.5)
    keeper.add(_fake(tmp_path, 3), 0.5)  # a tie: kept only as the newest
    assert _epochs(tmp_path) == [1, 2, 3]
    keeper.add(_fake(tmp_path, 4), 0.5)
    assert _epochs(tmp_path) == [1, 2, 4]  # as MindCV: an equal later score does not displace
    keeper.add(_fake(tmp_path, 5), 0.6)
    assert _epochs(tmp_path) == [1, 5]


def test_top_k_unscored_rank_last(tmp_path: Path) -> None:
    keeper = CheckpointKeeper(tmp_path, MODEL, "top_k", keep=2)
    keeper.add(_fake(tmp_path, 1), None)
    keeper.add(_fake(tmp_path, 2), 0.1)
    keeper.add(_fake(tmp_path, 3), float("nan"))
    assert _epochs(tmp_path) == [1, 2, 3]  # 3 is the newest
    keeper.add(_fake(tmp_path, 4), 0.0)
    assert _epochs(tmp_path) == [2, 4]  # any score beats none, even 0.0
    text = (tmp_path / "checkpoints.json").read_text()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))


def test_unknown_checkpoints_on_disk_rank_as_unscored(tmp_path: Path) -> None:
    _fake(tmp_path, 1)  # from a run before the index existed
    keeper = CheckpointKeeper(tmp_path, MODEL, "top_k", keep=1)
    keeper.add(_fake(tmp_path, 2), 0.3)
    assert _epochs(tmp_path) == [2]


def test_index_survives_a_new_keeper(tmp_path: Path) -> None:
    first = CheckpointKeeper(tmp_path, MODEL, "top_k", keep=2)
    first.add(_fake(tmp_path, 1), 0.1)
    first.add(_fake(tmp_path, 2), 0.9)
    assert (tmp_path / "checkpoints.json").is_file()
    second = CheckpointKeeper(tmp_path, MODEL, "top_k", keep=2)  # e.g. after auto_resume
    assert second.scores == first.scores
    second.add(_fake(tmp_path, 3), 0.5)
    assert _epochs(tmp_path) == [2, 3]  # 0.1 dropped: without the index, 0.9 would have gone instead
    assert set(json.loads((tmp_path / "checkpoints.json").read_text())["scores"]) == {f"{MODEL}-2_10", f"{MODEL}-3_10"}
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("text", ["not json", "[1, 2]", '{"a": "high"}', '{"a": {"b": 1}}', ""])
def test_unreadable_index_is_not_fatal(tmp_path: Path, text: str) -> None:
    (tmp_path / "checkpoints.json").write_text(text)
    keeper = CheckpointKeeper(tmp_path, MODEL, "top_k", keep=1)
    assert keeper.scores == {}
    keeper.add(_fake(tmp_path, 1), 0.5)
    assert json.loads((tmp_path / "checkpoints.json").read_text())["scores"] == {f"{MODEL}-1_10": 0.5}


def test_first_index_format_is_still_read(tmp_path: Path) -> None:
    """Run folders written before interim checkpoints existed hold only the scores."""
    (tmp_path / "checkpoints.json").write_text(json.dumps({f"{MODEL}-1_10": 0.9, f"{MODEL}-2_10": 0.1}))
    _fake(tmp_path, 1), _fake(tmp_path, 2)
    keeper = CheckpointKeeper(tmp_path, MODEL, "top_k", keep=2)
    keeper.add(_fake(tmp_path, 3), 0.5)
    assert _epochs(tmp_path) == [1, 3]


def _fake_interim(directory: Path, epoch: int, step: int) -> CheckpointRef:
    ref = checkpoint_ref(directory, MODEL, epoch, step)
    ref.weights.write_bytes(b"w")
    ref.state.write_bytes(b"s")
    return ref


@pytest.mark.parametrize("policy", ["latest_k", "top_k", "none"])
def test_interim_checkpoints_stand_outside_the_policy(tmp_path: Path, policy: str) -> None:
    """Only the newest interim checkpoint is kept, it never pushes out an epoch checkpoint, and the
    next epoch-end checkpoint removes it."""
    keeper = CheckpointKeeper(tmp_path, MODEL, policy, keep=2)
    keeper.add(_fake(tmp_path, 1), 0.5)
    keeper.add(_fake(tmp_path, 2), 0.6)
    keeper.add(_fake_interim(tmp_path, 3, 4), None, interim=True)
    keeper.add(_fake_interim(tmp_path, 3, 8), None, interim=True)
    on_disk = [(r.epoch, r.step) for r in list_checkpoints(tmp_path)]
    assert on_disk == [(1, 10), (2, 10), (3, 8)]
    reloaded = CheckpointKeeper(tmp_path, MODEL, policy, keep=2)  # the interim list survives a restart
    reloaded.add(_fake(tmp_path, 3), 0.7)
    expected = [(1, 10), (2, 10), (3, 10)] if policy == "none" else [(2, 10), (3, 10)]
    assert [(r.epoch, r.step) for r in list_checkpoints(tmp_path)] == expected
    assert json.loads((tmp_path / "checkpoints.json").read_text())["interim"] == []


def test_an_epoch_checkpoint_may_reuse_the_interim_name(tmp_path: Path) -> None:
    """A stop after the last batch of an epoch saves under the epoch-end name; the epoch-end save that
    follows on resume overwrites it and must not delete it as a stale interim checkpoint."""
    keeper = CheckpointKeeper(tmp_path, MODEL, "latest_k", keep=2)
    keeper.add(_fake_interim(tmp_path, 1, 10), None, interim=True)
    keeper.add(_fake(tmp_path, 1), None)
    assert [(r.epoch, r.step) for r in list_checkpoints(tmp_path)] == [(1, 10)]


def test_remove_partial_files(tmp_path: Path) -> None:
    complete = _fake(tmp_path, 1)
    (tmp_path / f".{MODEL}-2_10.safetensors.abc123.tmp").write_bytes(b"half")
    orphan_state = checkpoint_ref(tmp_path, MODEL, 2, 10).state  # killed between state and weights
    orphan_state.write_bytes(b"s")
    orphan_ema = checkpoint_ref(tmp_path, MODEL, 2, 10).ema
    orphan_ema.write_bytes(b"e")
    other_model = tmp_path / "resnet50-2_10.state.pt"
    other_model.write_bytes(b"s")
    removed = remove_partial_files(tmp_path, MODEL)
    assert sorted(p.name for p in removed) == sorted(
        [f".{MODEL}-2_10.safetensors.abc123.tmp", orphan_state.name, orphan_ema.name]
    )
    assert complete.weights.exists() and complete.state.exists() and other_model.exists()
    assert remove_partial_files(tmp_path / "missing", MODEL) == []


def test_policy_none_deletes_nothing(tmp_path: Path) -> None:
    keeper = CheckpointKeeper(tmp_path, MODEL, "none", keep=1)
    for epoch in range(1, 5):
        assert keeper.add(_fake(tmp_path, epoch), None) == []
    assert _epochs(tmp_path) == [1, 2, 3, 4]


def test_keeper_with_real_checkpoints(tmp_path: Path, model: torch.nn.Module) -> None:
    keeper = CheckpointKeeper(tmp_path, MODEL, "latest_k", keep=2)
    for epoch in (1, 2, 3):
        ref = checkpoint_ref(tmp_path, MODEL, epoch, 5)
        save_checkpoint(ref, model, _state(epoch))
        keeper.add(ref, None)
    assert _epochs(tmp_path) == [2, 3]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"{MODEL}-{e}_5{s}" for e in (2, 3) for s in (".safetensors", ".state.pt")] + ["checkpoints.json"]
    )


# --- random number generators ---------------------------------------------------------------------


def _draw() -> tuple:
    return (
        torch.rand(5),
        torch.randint(0, 1000, (3,)),
        np.random.rand(5),
        np.random.randn(3),  # odd count: numpy keeps a cached Gaussian
        [random.random() for _ in range(3)],
        random.gauss(0, 1),
        random.randrange(10**9),
    )


def _same(a: tuple, b: tuple) -> bool:
    return (
        torch.equal(a[0], b[0])
        and torch.equal(a[1], b[1])
        and np.array_equal(a[2], b[2])
        and np.array_equal(a[3], b[3])
        and a[4:] == b[4:]
    )


def _scramble_generators() -> None:
    torch.manual_seed(1)
    np.random.seed(1)
    random.seed(1)
    np.random.randn(1)  # leave a cached Gaussian behind
    random.gauss(0, 1)


def test_rng_state_round_trip() -> None:
    _scramble_generators()
    state = rng_state()
    expected = _draw()
    _draw()  # move on, and reseed for good measure
    torch.manual_seed(99)
    np.random.seed(99)
    random.seed(99)
    assert not _same(_draw(), expected)
    set_rng_state(state)
    assert _same(_draw(), expected)


def test_rng_state_survives_a_weights_only_checkpoint(tmp_path: Path, model: torch.nn.Module) -> None:
    _scramble_generators()
    ref = checkpoint_ref(tmp_path, MODEL, 1, 1)
    save_checkpoint(ref, model, _state(rng=[rng_state()]))
    expected = _draw()
    torch.manual_seed(5)
    np.random.seed(5)
    random.seed(5)
    set_rng_state(load_state(ref.state)["rng"][0])
    assert _same(_draw(), expected)


# --- atomic writes --------------------------------------------------------------------------------


def test_atomic_path_replaces_on_success(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "file.bin"
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp != target
        tmp.write_bytes(b"new")
        assert not target.exists()  # nothing under the final name until the body is done
    assert target.read_bytes() == b"new"
    assert os.listdir(target.parent) == ["file.bin"]


def test_atomic_path_keeps_the_old_file_when_the_body_raises(tmp_path: Path) -> None:
    target = tmp_path / "file.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="boom"), atomic_path(target) as tmp:
        tmp.write_bytes(b"half of the new")
        raise RuntimeError("boom")
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["file.bin"]


def test_atomic_path_creates_nothing_when_the_body_raises(tmp_path: Path) -> None:
    with pytest.raises(KeyboardInterrupt), atomic_path(tmp_path / "file.bin") as tmp:
        tmp.write_bytes(b"x")
        raise KeyboardInterrupt
    assert os.listdir(tmp_path) == []


def test_failed_state_write_keeps_the_previous_checkpoint(tmp_path: Path, model: torch.nn.Module) -> None:
    ref = checkpoint_ref(tmp_path, MODEL, 1, 1)
    save_checkpoint(ref, model, _state(1))
    before = (ref.weights.read_bytes(), ref.state.read_bytes())
    with pytest.raises(Exception):  # noqa: B017 - whatever torch raises for an unpicklable object
        save_checkpoint(ref, model, _state(2, bad=lambda: None))
    assert (ref.weights.read_bytes(), ref.state.read_bytes()) == before
    assert load_state(ref.state)["epoch"] == 1
    assert _leftovers(tmp_path) == []
