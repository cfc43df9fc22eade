"""Where the repository and its shipped files are."""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]  # the repository (pipeline_lib/settings/../..)
SCHEMA_PATH = REPO_ROOT / "workflow" / "schemas" / "config.schema.yaml"
ACCELERATE_DIR = REPO_ROOT / "config" / "accelerate"  # the shipped accelerate configs
