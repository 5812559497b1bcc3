"""Evaluation: Fréchet distances, toy metrics, FVD/FID/CLIP protocols."""
