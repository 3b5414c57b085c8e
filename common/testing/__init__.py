"""Tiny models and tokenizers built locally, for the tests, the smoke run and the benchmarks."""
