"""Measuring tools: the memory planner and the compiled-HLO statistics."""
