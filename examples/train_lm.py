"""Wrapper: the example ships inside the package (python -m adaptmoe.examples.train_lm)."""
from adaptmoe.examples.train_lm import main

if __name__ == "__main__":
    main()
