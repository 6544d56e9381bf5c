"""Evaluation metrics, one module each: domain FID (digits-classifier features, computed by torch-fidelity) in
:mod:`dblocks.metrics.fid`, Inception-v3 weights in :mod:`dblocks.metrics.inception`, cached reference
statistics in :mod:`dblocks.metrics.reference`, MAUVE in :mod:`dblocks.metrics.mauve`, generative perplexity in
:mod:`dblocks.metrics.gen_ppl`. Label domain-FID values with ``fid.FID_LABEL``, never as Inception FID.

The package imports none of them: torch-fidelity pulls in torchvision and torch._dynamo (about two seconds),
which every pipeline job would otherwise pay at start-up (their error, InceptionWeightsError, is in
:mod:`dblocks.errors`)."""
