"""Catalog cases (see catalog.py): to be filled."""

CASES = []
