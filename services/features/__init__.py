"""The features service: turns each profile's history into online and point-in-time
correct features."""
