"""Ray cluster-launcher configs for cafe-ray: checks that Ray's own schema cannot make."""
