"""Training: the one loop, its objectives, optimizer and schedules, and resumable run checkpoints."""
