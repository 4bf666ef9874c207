"""Datasets, folds, losses and the training loop for the diffusion model and the baseline presegmenter."""
