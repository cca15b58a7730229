"""An experiment: the `trinityx run` pipeline (stages, run folder, resumption; `pipeline`) and the report it
writes from results.json (`report`)."""
