"""What exists only to test and demo the worker: a local Antenna server and synthetic images.

Production code never imports this package; the CLI loads it only inside ``serve-antenna`` and ``demo``.
"""
