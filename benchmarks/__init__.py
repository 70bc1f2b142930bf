"""Benchmarks: scripts that measure speed and quality and write JSON (+ PNG) to benchmarks/results/."""
