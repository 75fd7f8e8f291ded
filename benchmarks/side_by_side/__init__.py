"""The sections of ``benchmarks/bench.py``: every comparison measured side by side in one run.

Each section module has ``run(ctx) -> Section``; the values it measures go to the JSON report
as they are and to the Markdown report as tables with a ratio per row. Timings are reported,
never asserted: the machine is shared and noisy, so only ratios within one run mean much.
"""
