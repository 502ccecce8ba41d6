"""Segmentation of a smear into red cells, white cells and platelets (classical and U-Net),
and the pixel-size estimate that rests on it."""
