"""Benchmarks and reports behind `codecllm bench`."""
