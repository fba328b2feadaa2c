"""Audio in, features out: decoding (soundfile, channel choice, soxr resampling), the file
formats we recognise, and the front ends (frozen configs, torch-free; batched torch compute).

May import: ``errors``, ``records``, ``paths``, ``io.storage`` (URLs).
Never ``engine``, ``pipeline``, ``cli``. Only
``features`` imports torch.
"""
