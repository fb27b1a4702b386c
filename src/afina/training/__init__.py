"""The training loop, its loss, checkpoints, schedules, precision and metrics."""
