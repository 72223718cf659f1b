"""Calibration data: reading, preprocessing, validation and the read-once calibration set."""
