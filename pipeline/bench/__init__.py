"""``apmpipe bench``: throughput, bytes and fidelity measured side by side in one process, reported as ratios.

Timings on shared machines are noisy, so every benchmark measures its baseline in the same run, on the same
device, with the same model and batch, and prints the ratio (the number to compare against a target). One module
per bench (``extract``, ``train``, ``pipeline``, ``codecs``, ``ablation``, ``bytes``, ``augment``); ``measure``
holds the timing and measurement helpers they share, ``caches`` the scratch caches they measure on, ``runs`` the
trained-and-evaluated students of ``ablation`` and ``bytes``.
"""
