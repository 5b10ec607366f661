"""Ray Tune sweeps: space files (``space``), the Tuner (``sweep``), the parent-run summary
(``report``). Import the submodules; this package does not pull in Ray on import."""
