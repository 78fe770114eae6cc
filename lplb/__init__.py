"""lplb: per-batch linear-programming load balancing for MoE expert parallelism."""
