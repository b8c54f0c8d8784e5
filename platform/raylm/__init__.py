"""raylm: a Ray-native platform for the whole life of a large language model."""
__version__ = "0.1.0"
