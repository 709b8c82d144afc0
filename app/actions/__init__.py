"""The four metering actions (``service``) and what answers them: the interface
(``backend``), AWS (``upstream``) and the sandbox (``sandbox``); and the RegisterUsage
gate a paid container product runs at start (``registration``)."""
