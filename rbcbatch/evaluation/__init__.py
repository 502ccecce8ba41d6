"""Scores against truth (instance matching, Dice, IoU, precision/recall) for any stage."""
