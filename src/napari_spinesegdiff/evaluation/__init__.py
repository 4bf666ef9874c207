"""Metrics and the evaluation report (Dice, HD95, uncertainty AUROC, reliability)."""
