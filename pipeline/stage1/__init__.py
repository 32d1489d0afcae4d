"""Stage one: data adapters, frozen encoders and the feature-cache writer."""
