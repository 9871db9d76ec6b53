"""Benchmarks: each prints ratios against a baseline measured in the same run.

Machines here are shared and noisy, so absolute seconds are reported only as the raw figures
behind a ratio. `python -m bench --list`; `python -m bench NAME`; figures go to
reports/bench/NAME.json with the machine's core count.
"""
