"""The benchmarks shipped with distill, each a plug-in package of its own: ``digits`` (8x8 handwritten digits, a
pixel DDPM teacher) and ``text_digits`` (32x32 colored digits with captions, SD- and SD3-shaped latent teachers).

Each package holds its data, judge and feature networks, protocols and quickstart table, and describes itself with
one :class:`distill.registry.Benchmark` (``BENCHMARK`` in its ``__init__``), which ``pyproject.toml`` declares as an
entry point of the group ``distill.benchmarks``. The toolkit's core never imports from here: it finds benchmarks
through :mod:`distill.registry`, the way it finds a user's own benchmark in their own package.
"""
