"""effigen: efficient image generation, one library for the methods of fourteen recent papers."""

__version__ = "0.1.0"
