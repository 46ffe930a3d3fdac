"""The `vitmoe` command line: one module per command (train, eval, predict, analyze, sweep, merge,
upcycle, export, info, report, bench, demo; `main` dispatches), `options` for the options they share and the train
flags made from the TrainConfig fields, `common` for the error type and output helpers, `slurm` for
a sweep's members submitted as a SLURM job array (`vitmoe sweep --launcher slurm`)."""
