"""rbcbatch: distributed screening of blood-smear archives."""

__version__ = "0.1.0"
