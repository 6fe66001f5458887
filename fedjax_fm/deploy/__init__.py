"""Deployment on real devices (Flower)."""
