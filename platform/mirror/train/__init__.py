"""Training orchestration: run spec, the per-worker loop, and the Ray Train driver."""
