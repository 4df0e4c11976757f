"""optiscope.callbacks."""
