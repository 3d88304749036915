"""Example models and event generators, built from data that ships with installed packages."""
