"""Tasks: what is denoised, how the denoiser output is read, and which loss trains it.

A task is independent of the architecture (the layer stack) and of the schedule (the partition):
an experiment is a combination of the three. Every task works on a batch dict and exposes
* ``condition(batch)``: the clean input the network is conditioned on (image, class label, ...);
* ``target(batch)``: the clean target y that is noised and denoised;
* ``denoise(raw, z, sigma)``: the denoiser output D from the network's raw output;
* ``loss(raw, denoised, batch, weight)``: the per-block training loss, weighted by lambda(sigma).
"""

from dblocks.tasks.ar_text import ARTextTask, NextTokenEmbeddingTask
from dblocks.tasks.base import Task
from dblocks.tasks.classification import ClassificationTask, label_embeddings
from dblocks.tasks.images import ImageGenerationTask

__all__ = [
    "ARTextTask",
    "NextTokenEmbeddingTask",
    "Task",
    "ClassificationTask",
    "ImageGenerationTask",
    "label_embeddings",
]
