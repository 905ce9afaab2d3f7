"""Offline evaluation: `simulate` replays active learning with an oracle and reports learning curves, the sample
saving ratio against random sampling and the overall cost (labels + GPU hours).

Modules: ``datasets`` (data sets by spec), ``metrics`` (curve arithmetic), ``simulate`` (the loop and the
methods), ``report`` (results.json, learning_curves.png, report.md), ``command`` (the CLI subcommand). Nothing
heavy is imported here.
"""
