"""The schedule cluster: which steps are full (schedule), the parameters (params), calibration and forecasting."""
