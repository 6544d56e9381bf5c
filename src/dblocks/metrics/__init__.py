"""Evaluation metrics. Domain FID (digits-classifier features), computed by torch-fidelity: see
:mod:`dblocks.metrics.fid`. Label its values with :data:`FID_LABEL`, never as Inception FID."""

from dblocks.metrics.fid import (
    FEATURE_EXTRACTOR_NAME,
    FEATURE_LAYER,
    FID_LABEL,
    DigitsFeatureExtractor,
    DigitsFeatureNet,
    ImageTensorDataset,
    build_digits_feature_net,
    domain_fid,
    feature_net_accuracy,
    load_feature_net,
    register_digits_feature_extractor,
    save_feature_net,
    train_feature_net,
)

__all__ = [
    "FEATURE_EXTRACTOR_NAME",
    "FEATURE_LAYER",
    "FID_LABEL",
    "DigitsFeatureExtractor",
    "DigitsFeatureNet",
    "ImageTensorDataset",
    "build_digits_feature_net",
    "domain_fid",
    "feature_net_accuracy",
    "load_feature_net",
    "register_digits_feature_extractor",
    "save_feature_net",
    "train_feature_net",
]
