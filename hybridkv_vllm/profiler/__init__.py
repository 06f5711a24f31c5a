"""Calibration set and head profiler (``hybridkv profile``)."""
