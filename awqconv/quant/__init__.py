"""The AWQ quantizer: calibration, activation-aware scale search, clip search, scale folding,
and the round-to-nearest baseline. It produces a QuantizedModel and never imports ``formats``."""
