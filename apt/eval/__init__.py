"""Evaluation: Fréchet distances, FVD/FID/CLIP protocols (the toy demo's metrics are apt.toy)."""
