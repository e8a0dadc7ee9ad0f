"""Analysis of finished runs: scaling-law fits and their plots (optional dependencies: scipy, matplotlib)."""
