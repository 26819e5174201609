"""Training data: dataset preparation, DALI pipeline, fallback loader, synthetic data.

- ``format``: the prepared dataset format (manifest.jsonl + per-clip video and .npz; FORMAT.md).
- ``video``: PyAV encoding, probing, seeking decode, DALI-matching YUV->RGB.
- ``synth``: ``reenact synth`` (toy-head clips with ground-truth parameters).
- ``prepare``: ``reenact prepare`` (raw videos -> dataset, worker processes with timeouts).
- ``dataset``: a dataset opened for training, broken clips skipped and logged.
- ``pairs``: the one sampler of (source, driving) pairs and their augmentation, shared by the loaders.
- ``loaders``: ``DaliLoader``, ``FallbackLoader``, ``make_loader``.
- ``pncc``: ``batch_pncc`` renders P_s and P_d' for a batch on the training device.
"""
