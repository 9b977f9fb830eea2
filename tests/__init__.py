"""Triplane test suite; packages mirror the source layout."""
