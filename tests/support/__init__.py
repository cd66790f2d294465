"""Helpers shared by the test folders, imported one way: `from tests.support.<module> import ...`.

Fixtures stay in the conftest.py files (tests/conftest.py holds the shared ones: `corpus`, `one_thread`).
"""
