"""The toy pair: two tiny Wan-architecture models trained on procedural shape videos, with their data, probes, demo and training."""
