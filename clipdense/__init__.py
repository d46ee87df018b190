"""clipdense: caption quality -> dense CLIP features, on Ray."""
__version__ = "0.1.0"
