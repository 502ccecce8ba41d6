"""Per-cell measurements in µm: pure functions over (labels, image) returning columns.

`measure_cells` (scikit-image, cell by cell) is the reference; `measure.tensor`'s
`measure_cells_tensor` computes the same columns for all cells at once in torch (CPU or GPU),
and is what a run uses. It lives apart so that the reference loads no torch."""

from rbcbatch.measure.cells import CELL_MEASURES, empty_columns, measure_cells

__all__ = ["CELL_MEASURES", "empty_columns", "measure_cells"]
