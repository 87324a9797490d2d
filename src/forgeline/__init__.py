"""forgeline: a language model's whole life in one PyTorch-native package."""

__version__ = "0.1.0"
