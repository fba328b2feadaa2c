"""Model zoo: the registry (one table: id -> architecture, kwargs, checkpoint, front end), the
weight lookup (the only module that may touch a hub) and one ``nn.Module`` file per family.

May import: ``errors``, ``paths``, ``audio.frontend``. Architecture files do no I/O and never
print; ``registry`` is torch-free.
"""
