"""Helpers of fastopt's tests, one module per idea; imported as `helpers.<module>` (pyproject's
pytest `pythonpath` puts tests/ on sys.path). conftest.py holds the fixtures only."""
