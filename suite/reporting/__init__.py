"""Everything that reads records: reports, tables, charts, procurement, compare, baselines, the convergence gate."""
