"""Scores of sampled futures against the ground truth and the baselines, action following, and
pictures for people."""
