"""The search spaces shipped with eta (``search_spaces/`` in the repository), read-only package data."""
