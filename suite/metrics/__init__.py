"""Trackers that wrap the train loop from outside and return small dataclasses with units."""
