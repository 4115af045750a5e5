"""Benchmarks and their prompts, the judge, truncation of long prompts, and run comparison."""
