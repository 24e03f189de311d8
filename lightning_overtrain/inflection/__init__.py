"""The inflection point: crossing, forecast, the detector and the policy that acts on it."""
