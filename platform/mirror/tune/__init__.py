"""Ray Tune sweeps, in layers from the bottom up; each module imports only those before it:

``fields`` (``SpaceError``, typed readers), ``fit_slots`` (PBT's slot actor), ``spec``
(``SweepSpec``, ``Parameter``), ``report`` (the parent-run summary), ``trial`` (what every
trial shares), ``pbt``, ``schedulers`` (the ``SCHEDULERS`` table), ``space`` (``load_sweep``),
``sweep`` (the Tune driver). Import the submodules; this package does not pull in Ray on
import, and neither does ``space``."""
