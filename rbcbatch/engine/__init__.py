"""The engine: per-slide work shared by whole images and regions, the Ray actor, and the run."""

from rbcbatch.engine.config import CLASSIFIERS, SEGMENTERS, Models, RunConfig
from rbcbatch.engine.run import RunSummary, connect_ray, run

__all__ = ["CLASSIFIERS", "SEGMENTERS", "Models", "RunConfig", "RunSummary", "connect_ray", "run"]
