"""optiscope.experiments."""
