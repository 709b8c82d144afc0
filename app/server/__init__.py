"""The HTTP servers: the two listeners (``listeners``) and the limits they hold (``guard``)."""
