"""Library behind the Best-of-N alignment pipeline.

Pure mathematics (CDFs, ensembles, losses, estimators) lives in small, I/O-free modules;
stages in :mod:`pipeline_lib.stages` wire files to those functions and are what the
Snakemake scripts call.
"""

__version__ = "0.1.0"
