"""Per-cell measurements in µm: pure functions over (labels, image) returning columns."""

from rbcbatch.measure.cells import CELL_MEASURES, empty_columns, measure_cells

__all__ = ["CELL_MEASURES", "empty_columns", "measure_cells"]
