"""The embedding engine: dataset and length-bucketing sampler, DataLoader, batched inference on a
device at a precision, multi-device shards, and the content-keyed embedding cache.

May import: ``audio``, ``models``, ``errors``, ``records``, ``paths``. Never ``pipeline``, ``api``,
``cli``. ``config`` and ``cache`` are torch-free so a fully cached run never imports torch.
"""
