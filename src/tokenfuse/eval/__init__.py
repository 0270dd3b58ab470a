"""The evaluation harness: benches, metrics, the calibration search and the report."""
