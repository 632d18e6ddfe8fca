"""DALI pipeline definitions. Importing this package imports DALI: keep it behind a guard
(pirl_fast.loader_dali imports it only when the `dali` backend is asked for)."""
