"""`esp-run bench`: workload generation, request replay, metrics and plots."""
