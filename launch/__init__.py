"""Thin entry points: submitit jobs per phase (launch.submit)."""
