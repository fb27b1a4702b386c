"""The user's path as one pipeline: validate, split, tokenize, train, evaluate, compare."""
