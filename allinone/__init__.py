"""allinone: all-in-one weight-sharing supernets and mixed-precision compression for ASR."""

__version__ = "0.1.0"
