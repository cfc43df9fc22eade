"""Test-time builders shared by the unit and integration tests (tiny hub-layout models, tiny
datasets). pytest puts ``tests/`` on ``sys.path`` (rootdir conftest, no ``tests/__init__.py``),
so these import as ``support.<module>``."""
