"""Calibration: the capture engine and its observers (Gram statistics, activation ranges)."""
