"""Helpers for Kestrel's tests: tiny deterministic artifacts (tokenizers, models) built on the fly."""
