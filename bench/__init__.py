"""Benchmark: speed, FLOPs, runtime overhead and memory of blended plans against eager PyTorch."""
