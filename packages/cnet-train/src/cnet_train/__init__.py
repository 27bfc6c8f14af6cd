"""cnet-train: one YAML file to a trained ControlNet."""

__version__ = "0.1.0"
