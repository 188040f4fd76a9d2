"""MLflow runs of one experiment -> a tidy per-trial table -> the paper's tables and plots.

Every step is a pure function of a DataFrame so that it can be tested on fake runs and re-run at any
time, also while the experiment is still going: cells without a finished run are marked, never
dropped. Its modules, one job each, in the order the data flows:

- ``runs``: MLflow's runs frame -> one typed row per trial run (and the experiment's parent run);
- ``summary``: the seeds of each table cell aggregated, the paper's cell beside them;
- ``statistics``: 95 % t-intervals, the verdict against the table's best row, the paper's directions;
- ``recipe``: what the trials ran on, and so what the paper's column can be compared with;
- ``display``: the paper's layout as strings, Markdown and LaTeX;
- ``plot``: our top-1 against the table's axis as a PNG;
- ``distillation``: single distillation runs (not grids) beside the published large-to-small numbers;
- ``experiment``: :func:`~orchestrator.collate.experiment.collate_experiment`, the only I/O (read runs
  through ``orchestrator.tracking``, write parquet / Markdown / LaTeX / CSV / PNG, attach them to the
  experiment's parent run).

Layout of a table: one line per paper row (kernel sizes, (sparsity, width) pair, N, p or f) and, per
setting of that table (naive / RepLKNet, decomposed / sparse groups / + width, ...), our top-1 of the
final epoch (mean ± std over seeds and a 95 % t-interval), whether the row differs detectably from the
table's best, the best epoch, EMA top-1, params and FLOPs as counted for our model (sparsity-aware) and
the published top-1.

What the paper column means depends on the recipe the trials ran (``recipe.Recipe``, read from their
params): beside a laptop proxy (procedural data, tiny images, a few epochs) the ImageNet numbers are
context only, so no difference to them is printed and the comparison is one of directions (which row
ranks best, and whether the paper's best-vs-worst order shows on ours); on an ImageNet-style folder the
difference ``Δ`` is printed, and said to be like-for-like only when epochs and resolution match the paper.

The package re-exports nothing: its pure modules import without MLflow, which only ``experiment`` needs.
"""

__all__: list[str] = []
