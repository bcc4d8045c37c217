"""The formats of what a run records, shared by its writers and readers: typed events, the manifest
(provenance), the model card. Where they live in a run is the `runs` package's."""
