"""Checkpoints and the run directory: DCP save and restore with atomic publish (dcp), reads that
never unpickle and checksums (safe_dcp), what defines a run (identity), one run per directory
(runlock), and the run directory's layout (rundir)."""
