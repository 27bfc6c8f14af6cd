"""cnet-train: one YAML file to a trained ControlNet."""

__version__ = "0.1.0"  # the one version source: pyproject.toml reads it (tool.hatch.version)
