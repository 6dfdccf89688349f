"""Quality and speed benchmarks (runnable: `python -m lavida_agent.benchmarks.<name>`).

Each writes JSON + a Markdown table; numbers are measured, never asserted in tests.
"""
