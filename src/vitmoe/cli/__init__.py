"""The `vitmoe` command line: train, eval, merge, info, report, demo."""
