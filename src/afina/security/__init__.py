"""Protections for the data and models afina keeps: encryption at rest (`encryption`) and master-key
rotation (`rotation`). Each module says what it protects against and how it is used."""
