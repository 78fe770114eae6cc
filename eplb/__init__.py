"""eplb: static expert replication and placement for MoE expert parallelism."""
