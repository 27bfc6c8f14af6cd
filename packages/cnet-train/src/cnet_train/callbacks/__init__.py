"""Training callbacks: EMA, exports, checkpoints, throughput, non-finite guard, validation."""
