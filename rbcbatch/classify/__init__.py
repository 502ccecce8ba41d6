"""Morphology calls per red cell: the rules and the learned ResNet behind one interface."""
