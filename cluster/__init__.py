"""Ray runtime, job primitives, the geodiff4d CLI and deploy manifests."""
