"""Benchmark reporting: paired statistics, figures and the report of several methods on one test split."""
