"""Research tools over merge records: parameter conflicts, statistics, calibration fitting."""
