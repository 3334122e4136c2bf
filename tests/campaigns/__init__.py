"""Reliability campaigns: each runs with one command (python -m campaigns.NAME from tests/,
or python tests/campaigns/NAME.py) and prints its figures; tests run short versions."""
