"""Readers and writers of users' files: trial lists (CSV, Kaldi, VoxCeleb), wav.scp,
spk2utt/utt2spk, score files, Kaldi ark/scp vectors and precomputed embeddings.

Every reader rejects bad input with a ``UsageError`` naming the file and the line.
May import: ``errors``, ``records``, ``paths``, ``audio.formats``. Never torch, ``engine``
or ``cli``.
"""
