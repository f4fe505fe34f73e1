"""What a checkpoint is and how to walk it: families, loading, processors, calibration, capture,
attention recording, the block walk and the pruning engine."""
