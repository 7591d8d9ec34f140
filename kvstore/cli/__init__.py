"""The ``kvstore`` command line. Not imported by ``import kvstore``."""
