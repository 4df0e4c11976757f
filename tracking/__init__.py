"""optiscope.tracking."""
