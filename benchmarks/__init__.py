"""Benchmarks of aufs against peers measured in the same run. Run: python -m benchmarks --help"""
