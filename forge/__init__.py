"""Machinery shared by the entry points (train.py, sample.py, evaluate.py, bench.py).

Each module takes plain arguments, never a whole config object, and never imports an entry point.
"""
