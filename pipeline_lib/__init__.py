"""Library behind the Best-of-N alignment pipeline, in layers (each imports only from the ones
below it; docs/ARCHITECTURE.md):

``math`` (pure formulas) < ``settings`` (the config, parsed once) < ``io`` (tables, files) <
``models`` (loading, encoding, scorers) < ``generation`` (sampling backends, PRS) < ``train``
(trainers) < ``stages`` (one module per Snakemake rule; the workflow scripts call these).
"""

__version__ = "0.1.0"
