"""The build, one module per stage: calibrate, prune (recovery), export, validation (the gates' reference), compile,
gates, bundles, and the orchestrator (run); report holds what a build tells."""
