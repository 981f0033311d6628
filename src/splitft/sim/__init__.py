"""Simulated heterogeneity: device profiles, the cost model and the clock."""
