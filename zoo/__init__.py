"""zoo: flow matching and MeanFlow, trained, sampled and evaluated through one toolkit."""

__version__ = "0.1.0"
