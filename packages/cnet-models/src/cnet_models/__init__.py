"""cnet-models: model families, loading, the controlled UNet, text encoding and EMA."""

__version__ = "0.1.0"
