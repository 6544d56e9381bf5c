"""Checkpoints: round trip, atomic writes, refusal of corrupt or foreign files (never unpickling
them), and bit-identical resumption of training from a saved training state."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re

import pytest
import torch
from safetensors import safe_open
from torch import nn

from dblocks import checkpoint as ckpt
from dblocks.checkpoint import (
    FORMAT_VERSION,
    load_checkpoint,
    load_metadata,
    remove_checkpoint,
    save_checkpoint,
    sha256_file,
)
from dblocks.errors import CheckpointError
from dblocks.training_state import load_training_state, save_training_state

# --------------------------------------------------------------------------------------- helpers


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(6, 4, generator=g, requires_grad=True)
    counts = torch.arange(5, dtype=torch.int64)
    return {
        "block.weight": weight,
        "block.weight_tied": weight,  # the same tensor twice, as tied weights give
        "block.weight_t": weight.t(),  # a non-contiguous view
        "block.bias": torch.randn(6, generator=g).to(torch.bfloat16),
        "counts": counts,
        "counts_head": counts[:2],  # a contiguous view into the storage of counts
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 3),
    }


def _metadata() -> dict:
    return {"block": 2, "sigma_range": [0.5, 1.25], "config": {"width": 64, "name": "mlp"}}


def _save(tmp_path, name: str = "block.safetensors") -> tuple:
    path = tmp_path / name
    save_checkpoint(path, _tensors(), _metadata())
    return path, path.with_suffix(".json")


def _snapshot(directory) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def _raises(path, phrase: str):
    """CheckpointError whose message names the file and contains ``phrase``."""
    return pytest.raises(CheckpointError, match=rf"(?s){re.escape(path.name)}.*{re.escape(phrase)}")


def _data_offset(path) -> int:
    """Start of the tensor bytes: an 8-byte little-endian header length, then the JSON header."""
    return 8 + int.from_bytes(path.read_bytes()[:8], "little")


# ------------------------------------------------------------------------------------ round trip


def test_round_trip_tensors_and_metadata(tmp_path):
    path = tmp_path / "nested" / "dir" / "block.safetensors"  # parent dirs are created
    written = save_checkpoint(path, _tensors(), _metadata())

    tensors, metadata = load_checkpoint(path)

    assert set(tensors) == set(_tensors())
    for name, expected in _tensors().items():
        assert tensors[name].dtype == expected.dtype
        assert torch.equal(tensors[name], expected.detach()), name
    assert metadata == written == load_metadata(path)
    assert {k: metadata[k] for k in _metadata()} == _metadata()


def test_json_sidecar_records_format_hash_and_tensor_table(tmp_path, monkeypatch):
    path, json_path = _save(tmp_path)

    on_disk = json.loads(json_path.read_text())

    assert on_disk["format_version"] == FORMAT_VERSION
    # the file's sha256 by hashlib in one read, not by the module's own chunked helper
    assert on_disk["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    # and the helper, reading in chunks that do not divide the file, agrees with it
    assert path.stat().st_size % 7 != 0
    monkeypatch.setattr(ckpt, "_HASH_CHUNK_BYTES", 7)
    assert sha256_file(path) == on_disk["sha256"]
    assert on_disk["tensors"]["block.weight"] == {"shape": [6, 4], "dtype": "float32"}
    assert on_disk["tensors"]["block.weight_t"] == {"shape": [4, 6], "dtype": "float32"}
    assert on_disk["tensors"]["block.bias"] == {"shape": [6], "dtype": "bfloat16"}
    assert on_disk["tensors"]["scalar"] == {"shape": [], "dtype": "float32"}
    assert on_disk["block"] == 2
    assert json_path.read_text() == json.dumps(on_disk, sort_keys=True, indent=2) + "\n"


def test_lone_tensor_file_carries_its_metadata_in_the_header(tmp_path):
    path, _ = _save(tmp_path)

    with safe_open(path, framework="pt") as f:
        embedded = json.loads(f.metadata()[ckpt.HEADER_KEY])

    assert embedded == {**_metadata(), "format_version": FORMAT_VERSION}


def test_checkpoint_path_must_be_safetensors(tmp_path):
    with _raises(tmp_path / "block.pt", ".safetensors"):
        save_checkpoint(tmp_path / "block.pt", _tensors(), {})


def test_reserved_metadata_key_is_refused(tmp_path):
    path = tmp_path / "block.safetensors"
    with _raises(path, "'sha256'"):
        save_checkpoint(path, _tensors(), {"sha256": "deadbeef"})


def test_non_serialisable_metadata_names_the_key_and_writes_nothing(tmp_path):
    path = tmp_path / "out" / "block.safetensors"

    with _raises(path, "'config.activation'") as info:
        save_checkpoint(path, _tensors(), {"config": {"width": 3, "activation": torch.relu}})

    assert info.value.field == "config.activation"
    assert not path.parent.exists() or not any(path.parent.iterdir())


# ------------------------------------------------------------------------------------- atomicity


def test_failing_tensor_write_leaves_previous_checkpoint_untouched(tmp_path, monkeypatch):
    _save(tmp_path)
    before = _snapshot(tmp_path)

    def half_write_then_fail(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial bytes")
        raise OSError("disk full")

    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "save_file", half_write_then_fail)  # imported where it is used
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path / "block.safetensors", {"other": torch.ones(3)}, {"block": 9})

    assert _snapshot(tmp_path) == before  # same names (so no *.tmp left), same bytes


def test_failing_rename_leaves_previous_checkpoint_untouched(tmp_path, monkeypatch):
    _save(tmp_path)
    before = _snapshot(tmp_path)

    def refuse(src, dst):
        raise OSError("rename refused")

    monkeypatch.setattr(ckpt.os, "replace", refuse)
    with pytest.raises(OSError, match="rename refused"):
        save_checkpoint(tmp_path / "block.safetensors", {"other": torch.ones(3)}, {"block": 9})

    assert _snapshot(tmp_path) == before


def test_crash_between_the_two_renames_is_detected_not_loaded(tmp_path, monkeypatch):
    path, json_path = _save(tmp_path)
    real_replace = os.replace

    def replace_tensor_file_only(src, dst):
        if str(dst).endswith(".json"):
            raise OSError("crashed before commit")
        real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", replace_tensor_file_only)
    with pytest.raises(OSError):
        save_checkpoint(path, {"other": torch.ones(3)}, {"block": 9})
    monkeypatch.undo()

    assert sorted(p.name for p in tmp_path.iterdir()) == [json_path.name, path.name]
    with _raises(path, "checksum mismatch"):
        load_checkpoint(path)


# ------------------------------------------------------------------------------------ corruption


def test_flipped_byte_in_tensor_data_fails_checksum(tmp_path):
    path, _ = _save(tmp_path)
    data = bytearray(path.read_bytes())
    middle = (_data_offset(path) + len(data)) // 2
    data[middle] ^= 0xFF
    path.write_bytes(bytes(data))

    with _raises(path, "checksum mismatch: file is corrupted or was modified"):
        load_checkpoint(path)
    # The flip stays inside tensor data, so only the checksum can see it.
    tensors, _ = load_checkpoint(path, verify=False)
    assert any(not torch.equal(tensors[n], t.detach()) for n, t in _tensors().items())


def test_truncated_file_is_refused_with_and_without_verification(tmp_path):
    path, _ = _save(tmp_path)
    path.write_bytes(path.read_bytes()[: _data_offset(path) + 10])

    with _raises(path, "checksum mismatch"):
        load_checkpoint(path)
    with _raises(path, "not a readable safetensors file"):
        load_checkpoint(path, verify=False)


def test_missing_sidecar_is_an_incomplete_checkpoint(tmp_path):
    path, json_path = _save(tmp_path)
    json_path.unlink()

    with _raises(json_path, "incomplete checkpoint"):
        load_checkpoint(path)
    with _raises(json_path, "incomplete checkpoint"):
        load_metadata(path)


def test_missing_tensor_file(tmp_path):
    path, _ = _save(tmp_path)
    path.unlink()

    with _raises(path, "tensor file missing"):
        load_checkpoint(path)


def test_nothing_there(tmp_path):
    with _raises(tmp_path / "absent.safetensors", "no checkpoint"):
        load_metadata(tmp_path / "absent.safetensors")


@pytest.mark.parametrize(
    ("edit", "phrase"),
    [
        (lambda text: text[: len(text) // 2], "not valid JSON"),
        (lambda text: "[1, 2]", "must be a JSON object"),
        (lambda text: _edit_json(text, lambda r: r.pop("sha256")), "'sha256'"),
        (lambda text: _edit_json(text, lambda r: r.pop("format_version")), "'format_version'"),
        (lambda text: _edit_json(text, lambda r: r.update(format_version=FORMAT_VERSION + 1)), "newer than"),
        (lambda text: _edit_json(text, lambda r: r.update(format_version="1")), "'format_version'"),
    ],
    ids=["unparsable", "not-object", "no-sha256", "no-format-version", "newer-version", "version-not-int"],
)
def test_bad_sidecar(tmp_path, edit, phrase):
    path, json_path = _save(tmp_path)
    json_path.write_text(edit(json_path.read_text()))

    with _raises(json_path, phrase):
        load_checkpoint(path)


def _edit_json(text: str, change) -> str:
    record = json.loads(text)
    change(record)
    return json.dumps(record)


@pytest.mark.parametrize(
    ("change", "phrase"),
    [
        (lambda t: t.pop("counts"), "in the file but not the metadata: ['counts']"),
        (lambda t: t.update(extra={"shape": [1], "dtype": "float32"}), "in the metadata but not the file: ['extra']"),
        (lambda t: t.update({"block.weight": {"shape": [4, 6], "dtype": "float32"}}), "'tensors.block.weight'"),
        (lambda t: t.update({"counts": {"shape": [5], "dtype": "int32"}}), "'tensors.counts'"),
    ],
    ids=["name-missing", "name-extra", "shape", "dtype"],
)
def test_tensor_table_must_match_the_file(tmp_path, change, phrase):
    path, json_path = _save(tmp_path)
    json_path.write_text(_edit_json(json_path.read_text(), lambda r: change(r["tensors"])))

    with _raises(path, phrase):
        load_checkpoint(path)


class _Trap:
    """Unpickling this creates ``marker``: proof that a loader ran pickle."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_foreign_pickle_is_refused_and_never_executed(tmp_path):
    path, json_path = _save(tmp_path)
    marker = tmp_path / "pickle-ran"
    torch.save({"weight": torch.zeros(2), "payload": _Trap(marker)}, path)

    with _raises(path, "checksum mismatch"):
        load_checkpoint(path)
    with _raises(path, "not a readable safetensors file"):
        load_checkpoint(path, verify=False)
    json_path.unlink()
    with _raises(json_path, "incomplete checkpoint"):
        load_checkpoint(path)
    assert not marker.exists()

    # The trap is live: a pickle-based loader would have run it. (Through a buffer, because torch.load
    # itself hands files named *.safetensors to safetensors.)
    torch.load(io.BytesIO(path.read_bytes()), weights_only=False)
    assert marker.exists()


def test_load_metadata_does_not_read_the_tensor_file(tmp_path):
    path, _ = _save(tmp_path)
    path.write_bytes(b"garbage")

    assert load_metadata(path)["block"] == 2


# -------------------------------------------------------------------------------- training state

_WARMUP_STEPS = 4


def _build(seed: int, device: str = "cpu"):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / _WARMUP_STEPS))
    return model, optimizer, scheduler


def _train(model, optimizer, scheduler, data_gen: torch.Generator, steps: int) -> None:
    device = next(model.parameters()).device
    for _ in range(steps):
        x = torch.randn(8, 4, generator=data_gen).to(device)
        y = x.sum(dim=1, keepdim=True)
        # Global torch RNG (the CUDA one on a GPU), so it must be restored too.
        keep = (torch.rand(8, 1, device=device) > 0.25).float()
        loss = (keep * (model(x) - y) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()


def _weights(model) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


def _assert_bit_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def _interrupted_run(path, device: str = "cpu"):
    """Train 5 steps, save, train 5 more; returns (state path, weights after 10 steps, optimizer)."""
    model, optimizer, scheduler = _build(seed=0, device=device)
    data_gen = torch.Generator().manual_seed(123)
    _train(model, optimizer, scheduler, data_gen, 5)
    save_training_state(path, model, optimizer, scheduler, 5, {"data": data_gen}, extra={"epoch": 1})
    _train(model, optimizer, scheduler, data_gen, 5)
    return path, _weights(model), optimizer


@pytest.fixture
def interrupted_run(tmp_path):
    return _interrupted_run(tmp_path / "state.safetensors")


def _fresh_resume(path, device: str = "cpu"):
    model, optimizer, scheduler = _build(seed=1, device=device)  # different initial weights
    torch.manual_seed(999)  # and a different global RNG position (CPU and CUDA)
    data_gen = torch.Generator().manual_seed(7)
    info = load_training_state(path, model, optimizer, scheduler, {"data": data_gen})
    return model, optimizer, scheduler, data_gen, info


# CUDA joins the parametrisation only where a GPU exists, so CPU machines run (not skip) the CPU case.
@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_resume_is_bit_identical(tmp_path, device):
    path, expected_weights, expected_optimizer = _interrupted_run(tmp_path / "state.safetensors", device)
    model, optimizer, scheduler, data_gen, info = _fresh_resume(path, device)

    assert info == {"step": 5, "epoch": 1}
    assert scheduler.last_epoch == 5
    _train(model, optimizer, scheduler, data_gen, 5)

    _assert_bit_identical(_weights(model), expected_weights)
    resumed, original = optimizer.state_dict(), expected_optimizer.state_dict()
    assert resumed["param_groups"] == original["param_groups"]  # including tuple betas and lr
    for index, state in original["state"].items():
        _assert_bit_identical(resumed["state"][index], state)


def test_a_state_save_cut_between_its_renames_resumes_from_the_previous_state(tmp_path, monkeypatch, capsys):
    """A kill after the new tensor file is renamed into place but before its JSON is (a torn pair that fails
    its checksum) must not cost the job its resume state: the previous state is kept until the new one is
    committed, and resuming falls back to it; once resumed, the torn files are gone."""
    from dblocks import checkpoint, training_state

    path = tmp_path / "state.safetensors"
    model, optimizer, scheduler = _build(seed=0)
    data_gen = torch.Generator().manual_seed(123)
    _train(model, optimizer, scheduler, data_gen, 5)
    save_training_state(path, model, optimizer, scheduler, 5, {"data": data_gen})
    expected = _weights(model)
    assert not training_state.previous_generation(path).exists()  # dropped once a save is committed
    _train(model, optimizer, scheduler, data_gen, 3)

    real_replace = os.replace

    def killed_before_the_json(src, dst):
        if str(dst).endswith("state.json"):
            raise KeyboardInterrupt("killed")  # stands in for SIGKILL between the two renames
        real_replace(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", killed_before_the_json)
    with pytest.raises(KeyboardInterrupt):
        save_training_state(path, model, optimizer, scheduler, 8, {"data": data_gen})
    monkeypatch.setattr(checkpoint.os, "replace", real_replace)
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        load_checkpoint(path)  # the torn pair

    model, optimizer, scheduler, data_gen, info = _fresh_resume(path)
    assert info == {"step": 5}
    _assert_bit_identical(_weights(model), expected)
    assert "resuming from the previous one, step 5" in capsys.readouterr().err
    assert not path.exists() and training_state.previous_generation(path).exists()
    # the next save commits a new state and drops the previous generation; a removal takes both
    save_training_state(path, model, optimizer, scheduler, 6, {"data": data_gen})
    assert load_checkpoint(path)[1]["step"] == 6 and not training_state.previous_generation(path).exists()
    _train(model, optimizer, scheduler, data_gen, 1)
    training_state.remove_training_state(path)
    assert not list(tmp_path.iterdir())


def test_global_rng_restore_matters(interrupted_run):
    """Control: one extra draw from the global RNG after restoring breaks bit-identity, so the test
    above really depends on the restored RNG state."""
    path, expected_weights, _ = interrupted_run
    model, optimizer, scheduler, data_gen, _ = _fresh_resume(path)
    torch.rand(1)

    _train(model, optimizer, scheduler, data_gen, 5)

    assert any(not torch.equal(t, expected_weights[n]) for n, t in _weights(model).items())


def test_training_state_json_holds_no_tensors_and_tensor_names_are_flat(interrupted_run):
    path, _, _ = interrupted_run
    tensors, metadata = load_checkpoint(path)

    assert metadata["kind"] == "training_state" and metadata["step"] == 5
    expected_names = {"model/0.weight", "optim/0/exp_avg", "optim/0/exp_avg_sq", "optim/0/step", "rng/torch"}
    assert expected_names | {"rng/gen/data"} <= set(tensors)
    assert metadata["scheduler"]["lr_lambdas"] == [None]
    assert metadata["optimizer"]["param_groups"][0]["params"] == [0, 1, 2, 3]


def test_training_state_for_another_model_is_refused_without_changes(interrupted_run):
    path, _, _ = interrupted_run
    torch.manual_seed(0)
    wider = nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Linear(32, 1))
    optimizer = torch.optim.AdamW(wider.parameters())
    before = _weights(wider)

    with _raises(path, "'model/0.weight'"):
        load_training_state(path, wider, optimizer, None, {"data": torch.Generator()})
    _assert_bit_identical(_weights(wider), before)

    deeper = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1), nn.Linear(1, 1))
    with _raises(path, "the checkpoint lacks ['3.bias', '3.weight']"):
        load_training_state(path, deeper, torch.optim.AdamW(deeper.parameters()), None, {"data": torch.Generator()})


def test_training_state_generators_must_match(interrupted_run):
    path, _, _ = interrupted_run
    model, optimizer, scheduler = _build(seed=0)

    with _raises(path, "generators ['data'] were saved"):
        load_training_state(path, model, optimizer, scheduler, {"noise": torch.Generator()})


def test_plain_checkpoint_is_not_a_training_state(tmp_path):
    path, _ = _save(tmp_path)
    model, optimizer, scheduler = _build(seed=0)

    with _raises(path, "not a training state"):
        load_training_state(path, model, optimizer, scheduler, {})


def test_staging_files_of_a_killed_writer_are_swept(tmp_path):
    """SIGKILL during a save leaves hidden staging files; the next save of that file, or its removal
    (a finished job dropping its resume state), takes them away. Other files' staging files stay."""
    path = tmp_path / "state.safetensors"
    for name in (".state.safetensors.abc.tmp", ".state.json.def.tmp", ".other.safetensors.ghi.tmp"):
        (tmp_path / name).write_bytes(b"half a write")
    save_checkpoint(path, {"w": torch.ones(2)}, {"kind": "test"})
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".other.safetensors.ghi.tmp",
        "state.json",
        "state.safetensors",
    ]
    (tmp_path / ".state.safetensors.xyz.tmp").write_bytes(b"another half")
    remove_checkpoint(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.safetensors.ghi.tmp"]
